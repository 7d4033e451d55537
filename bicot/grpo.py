"""BiCoTGRPO: the root LightningModule that composes policy, reference, rewards and the loss."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch

from bicot import loop
from bicot.checkpointing import CheckpointMismatchError, model_fingerprint
from bicot.evaluation import ScoreTally
from bicot.loss import GRPOConfig, group_std
from bicot.parallel import ParallelConfig, gathered, parallelize
from bicot.progress import steps_trained
from bicot.rollout import Rollout
from bicot.scoring import ScoreCollector, folder_benchmark, split_records
from bicot.templates import resolve_template
from datamodules.records import PromptRecord
from modules.engine import EngineStats
from modules.policy import JanusPolicy
from modules.reference import ReferencePolicy
from modules.rewards.ensemble import RewardEnsemble
from modules.seeding import generate_janus, rank_share, share_start

LR_SCHEDULES = ("constant", "cosine", "linear")
# Parameters that AdamW does not decay: biases and normalization weights, by the name patterns and layer type of
# transformers' ``Trainer.get_decay_parameter_names`` (the optimizer of TRL's GRPOTrainer, which T2I-R1 builds on).
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of ``model``'s parameters exempt from weight decay (see :data:`NO_DECAY_PATTERNS`)."""
    names = set()
    for prefix, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            name = f"{prefix}.{leaf}" if prefix else leaf
            if isinstance(module, torch.nn.LayerNorm) or any(re.search(p, name.lower()) for p in NO_DECAY_PATTERNS):
                names.add(name)
    return names


class NonFiniteError(RuntimeError):
    """Too many updates in a row had non-finite rewards, advantages or gradients."""


def check_even_shares(prompts: int, group_size: int, world: int) -> None:
    """Training splits the ``prompts x group_size`` rollout rows of a step in equal shares over the processes."""
    if (prompts * group_size) % world:
        raise ValueError(
            f"data.batch_size x model.algo.num_generations = {prompts} x {group_size} = {prompts * group_size} "
            f"rollout rows must be divisible by the {world} processes (trainer.devices x trainer.num_nodes)"
        )


def _parts(names: set[str]) -> str:
    """The policy parts (:data:`modules.policy.PARTS`) that checkpoint keys ``policy.model...`` fall in, and LoRA."""
    found = set()
    for name in names:
        path = name.removeprefix("policy.model.").split(".")
        found.add("lora" if "lora_" in name else path[1] if path[0] == "model" and len(path) > 1 else path[0])
    return "[" + ", ".join(sorted(found)) + "]"


class BiCoTGRPO(pl.LightningModule):
    """Trains a Janus policy with BiCoT-GRPO: each step is rollout -> score -> update.

    Args:
        policy: the model that plans and draws (trained).
        rewards: the expert ensemble that scores images.
        algo: the algorithm's hyperparameters (G, beta, clipping, aggregation, levels, mu).
        reference: the frozen KL anchor; ``None`` copies the policy's starting weights when beta > 0.
        reasoning_template: a template name from ``bicot.templates.TEMPLATES`` or a text with ``{prompt}``.
        lr: AdamW learning rate (the paper: 1e-6).
        weight_decay: AdamW weight decay, on every trainable parameter but biases and normalization weights
            (:func:`no_decay_names`, as transformers' Trainer).
        betas: AdamW betas.
        warmup_steps: linear warm-up, in optimizer steps.
        lr_schedule: after warm-up, ``constant``, or ``cosine`` or ``linear`` (transformers' ``Trainer`` default,
            which the paper's run used) to 0 at ``trainer.max_steps``.
        grad_clip: max gradient norm (0 disables clipping; the norm is still logged).
        minibatch_size: rows per forward/backward in score and update (``None``: all rows at once).
        seed: base seed of rollout sampling; step ``s`` samples with a stream derived from (seed, s).
        accuracy_expert: an expert whose score 1 means "every constraint of the prompt holds"; its rate
            is logged as ``val/accuracy`` and ``val/accuracy/<category>``.
        validate_before_fit: score the starting policy on the validation prompts before the first step.
        max_consecutive_skips: an update whose rewards, advantages or gradients are not finite is
            skipped (``train/skipped_steps`` counts them); this many skips in a row stop the run.
        parallel: activation checkpointing, FSDP2 mixed precision, reference placement, compile
            (see :class:`bicot.parallel.ParallelConfig`).
    """

    def __init__(
        self,
        policy: JanusPolicy,
        rewards: RewardEnsemble,
        algo: GRPOConfig | None = None,
        reference: ReferencePolicy | None = None,
        reasoning_template: str = "default",
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        grad_clip: float = 1.0,
        minibatch_size: int | None = None,
        seed: int = 0,
        accuracy_expert: str | None = None,
        validate_before_fit: bool = False,
        max_consecutive_skips: int = 3,
        parallel: ParallelConfig | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.algo = algo or GRPOConfig()
        if self.algo.train_plan and not policy.use_plan:
            raise ValueError(
                f"algo.levels={self.algo.levels!r} trains plan tokens but model.policy.use_plan is false; "
                "use levels: token to train image tokens without plans"
            )
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if grad_clip < 0 or warmup_steps < 0:
            raise ValueError(f"grad_clip and warmup_steps must be >= 0, got {grad_clip}, {warmup_steps}")
        if minibatch_size is not None and minibatch_size < 1:
            raise ValueError(f"minibatch_size must be >= 1 or null, got {minibatch_size}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (AdamW's), got {list(betas)}")
        if not math.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.policy = policy
        self.rewards = rewards
        if self.algo.beta > 0 and reference is None:
            reference = ReferencePolicy.from_policy(policy)
        elif self.algo.beta > 0 and reference.model is None:
            reference.adopt(policy)  # a reference without a checkpoint is the policy's starting weights
        self.reference = reference if self.algo.beta > 0 else None
        self.template = resolve_template(reasoning_template) if policy.use_plan else None
        self.optim_args = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas))
        self.warmup_steps, self.lr_schedule, self.grad_clip = warmup_steps, lr_schedule, grad_clip
        self.minibatch_size = minibatch_size
        self.seed = seed
        if accuracy_expert is not None and accuracy_expert not in rewards.names:
            raise ValueError(f"accuracy_expert={accuracy_expert!r} is not one of the experts {rewards.names}")
        self.accuracy_expert = accuracy_expert
        self.validate_before_fit = validate_before_fit
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.parallel = parallel or ParallelConfig()
        self._laid_out = False
        self.phase_peak_memory: dict[str, int] = {}  # bytes, per phase, on CUDA
        self.skipped_steps = 0
        self.consecutive_skips = 0
        # Checkpoints hold only what trains (see on_save_checkpoint): load them non-strictly.
        self.strict_loading = False
        self.last_rollout: Rollout | None = None  # read by callbacks (sample grids, statistics)
        self._engine_logged = None  # the static engine's stats at the last logged step

    # ---- set-up --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse fp16 loss scaling and a ``max_steps`` that is not a multiple of ``mu``; on a GPU, warn before the
        first step when the memory plan says this run cannot fit."""
        if stage != "fit":
            return
        max_steps, mu = getattr(self.trainer, "max_steps", -1), self.algo.mu
        if max_steps is not None and max_steps > 0 and max_steps % mu:
            # each rollout makes mu optimizer steps: the run would stop past max_steps, off its schedule's end
            raise ValueError(
                f"trainer.max_steps ({max_steps}) must be a multiple of model.algo.mu ({mu}): each rollout makes "
                f"mu optimizer steps, so the run would end at step {-(-max_steps // mu) * mu}"
            )
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # the update clips and checks the gradient norm before optimizer.step(), where Lightning's GradScaler
            # would only unscale: the norm would be the scaled one, and a scaler that never updates after an
            # overflow turns every step into a skip
            raise ValueError(
                "trainer.precision: fp16 with loss scaling (16-mixed) is not supported; use bf16-mixed or 32-true"
            )
        if self.device.type != "cuda":
            return
        from bicot.memory import plan, recipe_from_module, warn_if_too_big

        total_gib = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        warn_if_too_big(plan(recipe_from_module(self)), total_gib)

    def configure_model(self) -> None:
        """Lay out policy and reference (checkpointing, compile, FSDP2 when the strategy gives a mesh)."""
        if self._laid_out:
            return
        mesh = self.device_mesh
        if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
            mesh = mesh["data_parallel"]
        parallelize(self.policy.model, mesh, self.parallel)
        if self.reference is not None and self.reference.model is not None:  # None: shares the policy (LoRA)
            parallelize(self.reference.model, mesh, self.parallel, offload=self.parallel.reference == "cpu")
        self._laid_out = True

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters: check model.policy.trainable")
        params: list = [p for _, p in named]
        if self.optim_args["weight_decay"] > 0:  # biases and norm weights are not decayed (as transformers' Trainer)
            exempt = no_decay_names(self.policy)
            groups = [[p for n, p in named if n not in exempt], [p for n, p in named if n in exempt]]
            if all(groups):
                params = [{"params": groups[0]}, {"params": groups[1], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(params, **self.optim_args)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self._lr_factor(s, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int, total: int | None) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant" or not total:  # no max_steps: no end to decay to
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1.0 - progress

    # ---- training ------------------------------------------------------------------------------
    def placement(
        self, prompts: int, stream: int, group_size: int | None = None, even: bool = True
    ) -> loop.RowPlacement:
        """This process's slice of the ``prompts * G`` global rollout rows, and the sampling seed.

        Args:
            prompts: prompts in the global batch (every process receives the same batch).
            stream: distinguishes steps (the global step) and evaluation batches.
            even: require an equal share per process (training); evaluation allows a short last share.
        """
        world, rank = self.trainer.world_size, self.trainer.global_rank
        total = prompts * (group_size or self.algo.num_generations)
        if even:
            check_even_shares(prompts, group_size or self.algo.num_generations, world)
        share = -(-total // world)  # ceil
        offset = min(rank * share, total)
        seed = (self.seed * 1_000_003 + stream) % (2**62)
        return loop.RowPlacement(seed, total, offset, min(share, total - offset))

    @contextmanager
    def _phase(self, name: str, times: dict[str, float]):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            self.phase_peak_memory[name] = torch.cuda.max_memory_allocated(self.device)
        times[name] = time.perf_counter() - start

    def training_step(self, batch: Sequence[PromptRecord], batch_idx: int) -> None:
        algo, times = self.algo, {}
        self.phase_peak_memory.clear()  # a phase this step skips (a skipped update) shows no stale peak
        lr = self.optimizers().param_groups[0]["lr"]  # the rate this step's update uses
        with self._phase("rollout", times), gathered(self.policy.model):
            rollout = loop.rollout_phase(
                self.policy, batch, algo.num_generations, self.template, self.placement(len(batch), self.global_step)
            )
        ref_model = None
        if self.reference is not None:  # with LoRA the reference is the policy's model, adapters off
            ref_model = self.reference.model if self.reference.model is not None else self.policy.model
        with self._phase("score", times), gathered(ref_model) if ref_model is not None else _nothing():
            loop.score_phase(
                rollout, self.rewards, algo, self.policy, self.reference, self.minibatch_size, self.gather_rows
            )
        stats = None
        if self._all_finite(rollout.rewards, rollout.advantages):
            with self._phase("update", times):
                denominator = self.trainer.strategy.reduce(
                    torch.tensor(loop.loss_denominator(rollout, algo), device=self.device), reduce_op="sum"
                )
                stats = loop.update_phase(
                    self.policy,
                    rollout,
                    algo,
                    self.manual_backward,
                    self._optimizer_step,
                    float(denominator),
                    self.trainer.world_size,
                    self.minibatch_size,
                )
        self.last_rollout = rollout
        self._log_step(rollout, stats, times, lr)
        if stats is None:
            self._skip(f"non-finite rewards or advantages at step {self.global_step}")

    def _optimizer_step(self) -> tuple[float, bool]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not math.isfinite(float(norm)):  # NaN/inf loss or gradients: never write them into weights
            optimizer.zero_grad(set_to_none=True)
            self._skip(f"non-finite gradient norm at step {self.global_step}")
            return float(norm), False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self.consecutive_skips = 0
        return float(norm), True

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """``[R] -> [R_global]``: every process's rows in global order (equal shares in training)."""
        if self.trainer.world_size == 1:
            return values
        return self.all_gather(values).reshape(-1)

    def _all_finite(self, *tensors: torch.Tensor) -> bool:
        """Whether every tensor is finite on every process (all processes must agree to skip)."""
        bad = torch.tensor(float(any(not torch.isfinite(t).all() for t in tensors)), device=self.device)
        return float(self.trainer.strategy.reduce(bad, reduce_op="sum")) == 0

    def _skip(self, why: str) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{self.consecutive_skips} updates in a row were skipped ({why}); stopping. Lower the "
                "learning rate, check the reward experts for NaN, or raise model.max_consecutive_skips."
            )

    # ---- checkpoints -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """What a checkpoint must match to resume here: the trainable parameters and the model's source."""
        shapes = [(n, tuple(p.shape)) for n, p in self.policy.named_parameters() if p.requires_grad]
        return model_fingerprint(shapes, self._source())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trainable weights: the reference, experts and frozen towers reload from source."""
        trainable = self._trained_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        run_id = next((getattr(lg, "run_id", None) for lg in self.loggers if hasattr(lg, "run_id")), None)
        checkpoint["bicot"] = {
            "fingerprint": self.fingerprint(),
            "mlflow_run_id": run_id,
            "skipped_steps": self.skipped_steps,
            "source": self._source(),  # for the message when a resume is refused
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)
        self.skipped_steps = checkpoint["bicot"].get("skipped_steps", 0)

    def check_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint that bicot did not write, or that a run of another model wrote."""
        meta = checkpoint.get("bicot")
        if meta is None:
            raise CheckpointMismatchError("this checkpoint was not written by bicot (no 'bicot' section)")
        if meta["fingerprint"] != self.fingerprint():
            raise CheckpointMismatchError(
                f"the checkpoint was written by a run of another model ({self._difference(checkpoint)}); resume "
                "with the config that wrote it, or start a new run without --ckpt_path"
            )

    def _trained_names(self) -> set[str]:
        """The state-dict keys of the weights that train: what a checkpoint holds."""
        return {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}

    def _source(self) -> str:
        return self.policy.source or repr(self.policy.tiny)

    def _difference(self, checkpoint: dict) -> str:
        """How a refused checkpoint differs from this run, as far as it says: the model source (checkpoints
        written since it is recorded) and the trained parameters (the weights it holds, bicot saves only those)."""
        meta = checkpoint["bicot"]
        source = meta.get("source")
        if source is not None and source != self._source():
            return f"model source {source!r}, here {self._source()!r}"
        saved = set(meta.get("trained") or checkpoint.get("state_dict") or ())
        here = self._trained_names()
        if saved and saved != here:
            parts = [_parts(saved), _parts(here)]
            if parts[0] != parts[1]:
                return f"it trained {parts[0]}, this run trains {parts[1]}: see model.policy.init_args.trainable"
            only = sorted(here - saved) or sorted(saved - here)
            where = "here only" if here - saved else "in the checkpoint only"
            return f"{len(here ^ saved)} trained parameters differ, e.g. {only[0]} ({where})"
        return f"trainable shapes or model source differ: fingerprint {meta['fingerprint']}, here {self.fingerprint()}"

    def _token_means(self, stats: loop.UpdateStats | None) -> dict[str, float]:
        """The update's token means (:data:`bicot.loop.TOKEN_MEANS`) over every process's valid tokens.

        Processes hold different numbers of plan tokens, so a mean of their means would be off; their sums
        and counts travel in one all-reduce instead. Every process calls it, a skipped update too.
        """
        pairs = [stats.token_sums.get(name, (0.0, 0)) if stats else (0.0, 0) for name in loop.TOKEN_MEANS]
        total = torch.tensor(pairs, dtype=torch.float64, device=self.device)  # [K, 2]: sum, tokens
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        return {name: s / n if n else 0.0 for name, (s, n) in zip(loop.TOKEN_MEANS, total.tolist(), strict=True)}

    def _log_step(
        self, r: Rollout, stats: loop.UpdateStats | None, times: dict[str, float], lr: float
    ) -> None:
        """Log the step's metrics. Every key is logged every step (Lightning would otherwise repeat a
        stale value); a skipped update logs NaN for what the update would have measured.

        With the static engine, also its compile and capture seconds and its CUDA-graph captures since the
        last logged step (this step's rollout, and any sampling in between: sample grids, validation), so
        a run shows that compiles happen at its start and how much re-capturing costs per step.
        """
        mean = dict(on_step=True, on_epoch=False, sync_dist=True, batch_size=r.num_rows)
        summed = dict(mean, reduce_fx="sum")
        self.log("train/reward", r.rewards.mean(), prog_bar=True, **mean)
        stds = group_std(r.global_rewards, r.group_size)  # the same on every process
        self.log("train/reward_std", stds.mean(), **mean)  # within groups, as TRL's reward_std
        for name, scores in r.reward_per_expert.items():
            self.log(f"train/reward/{name}", scores.mean(), **mean)
            unreadable = getattr(self.rewards.experts[name], "unreadable", 0)
            self.log(f"train/unreadable/{name}", float(unreadable), **dict(mean, reduce_fx="sum"))
            errors = getattr(self.rewards, "errors", {}).get(name, 0)
            self.log(f"train/expert_errors/{name}", float(errors), **dict(mean, reduce_fx="sum"))
        self.log("train/zero_std_frac", (stds < 1e-6).float().mean(), **mean)
        nan = float("nan")
        for key in ("loss", "policy_loss"):
            self.log(f"train/{key}", getattr(stats, key) if stats else nan, **summed)
        self.log("train/kl_max", stats.kl_max if stats else nan, **dict(mean, reduce_fx="max"))
        token_means = self._token_means(stats)
        exact = dict(mean, sync_dist=False)  # already the mean over every process's tokens
        for key in ("kl", "clip_frac"):
            self.log(f"train/{key}", token_means[key] if stats else nan, prog_bar=key == "kl", **exact)
        # the levels that train, constant over the run; a level that does not train has no reference log-probs,
        # so its KL is not measured: no key rather than a 0 that would read as "no drift"
        for level in loop.trained_levels(r, self.algo):
            self.log(f"train/kl_{level}", token_means[f"kl_{level}"] if stats else nan, **exact)
            self.log(f"train/rollout_kl/{level}", token_means[f"rollout_kl/{level}"] if stats else nan, **exact)
        gap = stats.rollout_logp_gap_max if stats else nan
        self.log("train/rollout_logp_gap_max", gap, **dict(mean, reduce_fx="max"))
        self.log("train/grad_norm", stats.grad_norm if stats else nan, **mean)
        skipped = self.skipped_steps + (0 if stats else 1)  # a reward skip is counted just after
        self.log("train/skipped_steps", float(skipped), **dict(mean, reduce_fx="max"))
        self.log("train/lr", lr, **mean)
        # over every process's rows (the same on any number of them), from the gathered rewards: no collective
        spread = loop.global_advantages(r, self.algo)
        self.log("train/advantage_std", spread.std() if spread.numel() > 1 else 0.0, **dict(mean, sync_dist=False))
        plan_tokens = r.plan_mask.sum(1).float().mean() if r.plan_mask is not None else 0.0
        self.log("train/plan_tokens", plan_tokens, **mean)
        for phase in ("rollout", "score", "update"):
            self.log(f"time/{phase}_s", times.get(phase, 0.0), **dict(mean, reduce_fx="max"))
        images_per_s = r.num_rows * self.trainer.world_size / max(sum(times.values()), 1e-9)
        self.log("perf/images_per_s", images_per_s, **mean)
        now = self.policy.engine_stats()
        if now is not None:
            before = self._engine_logged
            if before is None or now.steps < before.steps:  # the first step, or an engine built anew
                before = EngineStats()
            slowest = dict(mean, reduce_fx="max")
            self.log("time/engine_compile_s", now.compile_s - before.compile_s, **slowest)
            self.log("perf/engine_captures", float(now.captures - before.captures), **slowest)
            self._engine_logged = now

    # ---- evaluation and standalone generation --------------------------------------------------
    def evaluate(self, batch: Sequence[PromptRecord], batch_idx: int, tally: ScoreTally) -> None:
        """One image per prompt (with its plan), scored by every expert, added to ``tally``."""
        placement = self.placement(len(batch), 10**9 + batch_idx, group_size=1, even=False)
        # Every process gathers the sharded weights (a collective), even one with no rows to draw.
        with gathered(self.policy.model):
            if placement.rows == 0:
                return  # more processes than prompts in this batch
            rollout = loop.rollout_phase(self.policy, batch, 1, self.template, placement)
        out = self.rewards(rollout.images, rollout.records)
        categories = [r.task_type for r in rollout.records]
        tally.add("val/reward", out.total)
        for name, scores in out.per_expert.items():
            tally.add(f"val/reward/{name}", scores)
        if self.accuracy_expert is not None:
            tally.add("val/accuracy", (out.per_expert[self.accuracy_expert] >= 1.0 - 1e-6).float(), categories)

    def on_validation_epoch_start(self) -> None:
        self._tally = ScoreTally()

    def validation_step(self, batch: Sequence[PromptRecord], batch_idx: int) -> None:
        if batch:
            self.evaluate(batch, batch_idx, self._tally)

    def on_validation_epoch_end(self) -> None:
        metrics = self._tally.compute()  # already over every process's images
        within_fit = self.trainer.state.fn == "fit"
        for key, value in metrics.items():  # for callbacks (a ModelCheckpoint monitoring val/accuracy)
            # The values are the same on every process. With rank_zero_only, Lightning reduces nothing even where
            # sync_dist is set; sync_dist=True only tells it so (else it warns once per key to set it).
            self.log(
                key, value, on_step=False, on_epoch=True, rank_zero_only=True, sync_dist=True, logger=not within_fit
            )
        if within_fit and self.trainer.is_global_zero:
            # Lightning would log a validation within a fit at the step of the batch just trained (s - 1 after
            # s steps), while the grid of the same weights, and the validation before the first step (0), are at
            # the number of steps trained: put it there too
            for logger in self.loggers:
                logger.log_metrics(metrics, step=steps_trained(self.trainer))

    def on_train_start(self) -> None:
        """With ``validate_before_fit``, score the starting policy on the validation prompts (step 0). A resumed
        run does not: its starting policy was scored when the run began."""
        if not self.validate_before_fit or self.trainer.datamodule is None or self.global_step > 0:
            return
        loader = self.trainer.datamodule.val_dataloader()
        if not loader:
            return
        tally = ScoreTally()
        for batch_idx, batch in enumerate(loader):
            if batch:
                self.evaluate(batch, batch_idx, tally)
        metrics = tally.compute()
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    def predict_step(self, batch: Sequence[PromptRecord], batch_idx: int = 0) -> dict | None:
        """Images (with their plans) for this process's share of the batch; seeds per prompt and sample,
        so reruns and any number of processes draw the same images (see ``modules.seeding``)."""
        batch = rank_share(batch, self.trainer.global_rank, self.trainer.world_size)
        with gathered(self.policy.model):  # a collective: every process enters, even with no share
            if not batch:
                return None
            return generate_janus(self.policy, batch, self.policy.predict_images_per_prompt, self.template, self.seed)

    # ---- testing: generate, then score per category (`bicot test`) ---------------------------------
    def test_step(self, batch: Sequence[PromptRecord], batch_idx: int) -> dict | None:
        """Draw ``policy.predict_images_per_prompt`` images per prompt and score them with every expert.

        Each image has its own seed (``modules.seeding.image_seed(model.seed, line, sample)``), so the
        images do not depend on batching. Scores are summed per category (the records' ``task_type``).

        Returns:
            The predict dict (``images`` uint8 ``[R, H, W, 3]``, ``image_tokens``, ``plans``, ``prompts``,
            ``seeds``) so that a ``callbacks.prediction_writer.BenchmarkWriter`` writes the images too.
        """
        if getattr(self, "_test_scores", None) is None:
            categories = [r.task_type for r in split_records(self.trainer, "test")]
            self._test_scores = ScoreCollector(self.rewards.names, categories, self.device)
        # Every process receives the same global batch and draws its own share of whole prompts.
        rank, world = self.trainer.global_rank, self.trainer.world_size
        first = share_start(len(batch), rank, world)  # the share's first prompt in the global batch
        batch = rank_share(batch, rank, world)
        n = self.policy.predict_images_per_prompt
        with gathered(self.policy.model):  # a collective: every process enters, even with no share
            if not batch:
                return None
            out = generate_janus(self.policy, batch, n, self.template, self.seed)
        records = [r for r in batch for _ in range(n)]
        scores = self.rewards(out["images"], records)
        plans = out["plans"] or [None] * len(records)
        info = [{"plan": plan, "seed": seed} for plan, seed in zip(plans, out["seeds"], strict=True)]
        places = [(batch_idx, first * n + i) for i in range(len(records))]  # scores.jsonl: in prompt order
        self._test_scores.add(scores.per_expert, records, info, places)
        return out

    def on_test_epoch_end(self) -> None:
        """Log ``test/<expert>/<category>``, print the table, write it under ``<default_root_dir>/test_scores``.

        The benchmark is the one ``<default_root_dir>/prediction.json`` names, else inferred from the prompts.
        """
        records = split_records(self.trainer, "test")
        collector = getattr(self, "_test_scores", None)
        if collector is None:  # this process drew no batch; it still takes part in the metric's sync
            collector = ScoreCollector(self.rewards.names, [r.task_type for r in records], self.device)
        self._test_scores = None
        root = Path(self.trainer.default_root_dir)
        # A BenchmarkWriter writing into the same folder has already named the benchmark in prediction.json.
        collector.finish(self, root / "test_scores", root.resolve().name, folder_benchmark(root, records))


@contextmanager
def _nothing():
    yield
