"""BiCoTGRPO: construction checks, the learning-rate schedule, and two real Lightning steps on CPU."""

import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from standin_graphs import StandInGraphs

from bicot.grpo import BiCoTGRPO, NonFiniteError
from bicot.loss import GRPOConfig, group_std
from bicot.rollout import Rollout
from bicot.templates import REASONING_TEMPLATE
from datamodules.prompts import PromptDataModule
from modules.policy import JanusPolicy, SamplingConfig
from modules.reference import ReferencePolicy
from modules.rewards.base import RewardExpert
from modules.rewards.ensemble import RewardEnsemble
from modules.tiny import TinyJanusSpec

REPO = Path(__file__).resolve().parents[2]
TOY_PROMPTS = REPO / "datamodules" / "fixtures" / "toy_prompts.jsonl"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine the threads'
    spin-waiting makes these tests an order of magnitude slower. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Brightness(RewardExpert):
    name = "brightness"

    def score(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3)) / 255


class PromptLength(RewardExpert):
    name = "length"

    def score(self, images, prompts):
        return torch.tensor([min(len(p.prompt) / 100, 1.0) for p in prompts])


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


class NaNOnFirstCall(RewardExpert):
    """Brightness, but NaN on its first call: the first update is skipped."""

    name = "nan_first"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        scores = images.float().mean(dim=(1, 2, 3)) / 255
        return torch.full_like(scores, math.nan) if self.calls == 1 else scores


def make_policy(use_plan: bool = True) -> JanusPolicy:
    return JanusPolicy(tiny=TinyJanusSpec(), sampling=SamplingConfig(plan_max_tokens=4), use_plan=use_plan)


def rewards() -> RewardEnsemble:
    return RewardEnsemble([Brightness(), PromptLength()])


def make_module(policy: JanusPolicy | None = None, **kwargs) -> BiCoTGRPO:
    kwargs.setdefault("algo", GRPOConfig(num_generations=2))
    return BiCoTGRPO(policy or make_policy(), rewards(), **kwargs)


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("levels", ["both", "semantic"])
def test_training_plans_without_plans_raises(levels):
    with pytest.raises(ValueError, match="use_plan"):
        make_module(make_policy(use_plan=False), algo=GRPOConfig(num_generations=2, levels=levels))


def test_token_level_without_plans_builds_without_template():
    module = make_module(make_policy(use_plan=False), algo=GRPOConfig(num_generations=2, levels="token"))
    assert module.template is None


def test_template_is_resolved_when_the_policy_plans():
    assert make_module().template == REASONING_TEMPLATE
    assert make_module(reasoning_template="Plan {prompt}.").template == "Plan {prompt}."
    with pytest.raises(ValueError, match="prompt"):
        make_module(reasoning_template="no slot here")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-6), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(lr=math.inf), "lr"),
        (dict(lr_schedule="step"), "lr_schedule"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(minibatch_size=0), "minibatch_size"),
        (dict(betas=(0.9, 1.5)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(weight_decay=-1.0), "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)


def test_valid_edge_hyperparameters_pass():
    module = make_module(grad_clip=0.0, minibatch_size=1, lr_schedule="cosine", warmup_steps=0)
    assert module.minibatch_size == 1 and module.grad_clip == 0.0


def test_beta_zero_keeps_no_reference():
    given = ReferencePolicy.from_policy(make_policy())
    assert make_module(algo=GRPOConfig(num_generations=2, beta=0.0)).reference is None
    assert make_module(algo=GRPOConfig(num_generations=2, beta=0.0), reference=given).reference is None


def test_beta_positive_copies_the_policy_as_frozen_reference():
    policy = make_policy()
    module = make_module(policy, algo=GRPOConfig(num_generations=2, beta=0.01))
    ref = module.reference
    assert isinstance(ref, ReferencePolicy)
    own, copied = policy.model.state_dict(), ref.model.state_dict()
    assert own.keys() == copied.keys()
    for name, value in own.items():
        assert torch.equal(copied[name], value), name
    assert all(not p.requires_grad for p in ref.parameters())
    # a copy, not the same storage: training the policy must not move the anchor
    with torch.no_grad():
        policy.model.model.language_model.norm.weight.add_(1.0)
    assert not torch.equal(
        ref.model.model.language_model.norm.weight, policy.model.model.language_model.norm.weight
    )


def test_beta_positive_fills_a_reference_without_a_checkpoint_from_the_policy():
    policy = make_policy()
    empty = ReferencePolicy()
    module = make_module(policy, algo=GRPOConfig(num_generations=2, beta=0.01), reference=empty)
    assert module.reference is empty and empty.model is not policy.model
    for name, value in policy.model.state_dict().items():
        assert torch.equal(empty.model.state_dict()[name], value), name
    assert all(not p.requires_grad for p in empty.parameters())


def test_beta_positive_keeps_a_given_reference():
    given = ReferencePolicy.from_policy(make_policy())
    assert make_module(algo=GRPOConfig(num_generations=2, beta=0.01), reference=given).reference is given


# --------------------------------------------------------------------------- learning-rate schedule


def test_lr_factor_warmup_then_constant():
    module = make_module(warmup_steps=4, lr_schedule="constant")
    assert [module._lr_factor(s, 100) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert module._lr_factor(99, 100) == 1.0


def test_lr_factor_warmup_then_cosine_to_zero_at_max_steps():
    module = make_module(warmup_steps=4, lr_schedule="cosine")
    total = 14  # 10 cosine steps after warm-up
    assert module._lr_factor(0, total) == pytest.approx(0.25)
    assert module._lr_factor(3, total) == pytest.approx(1.0)
    assert module._lr_factor(4, total) == pytest.approx(1.0)  # cosine starts at its top
    assert module._lr_factor(9, total) == pytest.approx(0.5)  # half-way
    assert module._lr_factor(6, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert module._lr_factor(14, total) == pytest.approx(0.0, abs=1e-12)
    assert module._lr_factor(20, total) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end


def test_lr_factor_linear_is_transformers_default_schedule_after_warm_up():
    from transformers import get_linear_schedule_with_warmup

    total = 12
    hf = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf_schedule = get_linear_schedule_with_warmup(hf, num_warmup_steps=0, num_training_steps=total)
    expected = []
    for _ in range(total + 3):
        expected.append(hf.param_groups[0]["lr"])
        hf.step()
        hf_schedule.step()
    module = make_module(lr_schedule="linear")
    assert [module._lr_factor(s, total) for s in range(total + 3)] == pytest.approx(expected, abs=1e-12)
    assert expected[0] == 1.0 and expected[6] == pytest.approx(0.5) and expected[total] == 0.0
    warm = make_module(lr_schedule="linear", warmup_steps=2)  # bicot's warm-up never trains at 0 (see above)
    assert [warm._lr_factor(s, 12) for s in (0, 1, 2, 7, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    assert warm._lr_factor(5, None) == 1.0


def test_lr_factor_cosine_without_warmup_and_without_a_known_total():
    module = make_module(lr_schedule="cosine")
    assert module._lr_factor(0, 10) == pytest.approx(1.0)
    assert module._lr_factor(5, 10) == pytest.approx(0.5)
    assert module._lr_factor(5, None) == 1.0  # no max_steps: cosine has no end to decay to


# --------------------------------------------------------------------------- optimizer and update step


def _groups(module: BiCoTGRPO) -> list[tuple[float, set[str]]]:
    module._trainer = SimpleNamespace(max_steps=10)
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.policy.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


def test_weight_decay_spares_biases_and_norm_weights():
    policy = make_policy()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    (decay, decayed), (none, spared) = _groups(make_module(policy, weight_decay=0.1))
    assert decay == 0.1 and none == 0.0 and decayed | spared == trainable and not decayed & spared
    assert spared and all("norm" in n.split(".")[-2] or n.endswith(".bias") for n in spared)
    assert any(n.endswith("mlp.up_proj.weight") for n in decayed) and any("embed_tokens" in n for n in decayed)
    assert any(n.endswith("input_layernorm.weight") for n in spared)
    assert any(n.endswith("language_model.norm.weight") for n in spared)
    # no decay: one group, the layout of checkpoints written before the groups existed
    assert _groups(make_module(make_policy())) == [(0.0, trainable)]


def test_fp16_loss_scaling_is_refused():
    module = make_module()
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    with pytest.raises(ValueError, match="16-mixed"):
        module.setup("fit")
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))
    module.setup("fit")  # bf16-mixed (no scaler) on CPU: nothing to refuse


def test_max_steps_that_is_not_a_multiple_of_mu_is_refused():
    module = make_module(algo=GRPOConfig(num_generations=2, mu=2))
    plugin = SimpleNamespace(scaler=None)
    module._trainer = SimpleNamespace(precision_plugin=plugin, max_steps=5)
    with pytest.raises(ValueError, match=r"max_steps \(5\) must be a multiple of model.algo.mu \(2\).*at step 6"):
        module.setup("fit")
    for max_steps in (6, -1):  # a multiple, or no step limit (max_epochs ends the run)
        module._trainer = SimpleNamespace(precision_plugin=plugin, max_steps=max_steps)
        module.setup("fit")


def _stepper(max_consecutive_skips: int = 3, grad_clip: float = 1.0):
    module = make_module(lr=1e-3, grad_clip=grad_clip, max_consecutive_skips=max_consecutive_skips)
    module._trainer = SimpleNamespace(max_steps=10, global_step=0)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: scheduler
    params = [p for p in module.policy.parameters() if p.requires_grad]
    return module, optimizer, scheduler, params


def test_the_step_clips_to_grad_clip_and_returns_the_norm_before_clipping():
    module, _, scheduler, params = _stepper(grad_clip=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    before = {id(p): p.detach().clone() for p in params}
    total = math.sqrt(sum(p.numel() for p in params))
    seen = []
    module.optimizers().register_step_pre_hook(
        lambda *_: seen.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params)))
    )
    norm, applied = module._optimizer_step()
    assert applied and norm == pytest.approx(total, rel=1e-5)  # logged as train/grad_norm: before clipping
    assert seen == [pytest.approx(0.5, rel=1e-4)]  # what AdamW received
    assert all(p.grad is None for p in params) and scheduler.last_epoch == 1
    assert any(not torch.equal(p, before[id(p)]) for p in params)


def test_a_non_finite_gradient_norm_skips_the_step_and_the_schedule():
    module, optimizer, scheduler, params = _stepper(max_consecutive_skips=2)
    before = {id(p): p.detach().clone() for p in params}
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0] = math.nan
    norm, applied = module._optimizer_step()
    assert math.isnan(norm) and not applied
    assert all(p.grad is None for p in params)  # NaN gradients do not leak into the next step
    assert all(torch.equal(p, before[id(p)]) for p in params) and not optimizer.state
    assert scheduler.last_epoch == 0  # the schedule counts applied optimizer steps, as global_step does
    assert module.skipped_steps == 1 and module.consecutive_skips == 1
    for p in params:
        p.grad = torch.zeros_like(p)
    assert module._optimizer_step() == (0.0, True) and module.consecutive_skips == 0  # a step resets the run
    for _ in range(2):
        params[0].grad = torch.full_like(params[0], math.inf)
        if module.consecutive_skips == 1:
            with pytest.raises(NonFiniteError, match="2 updates in a row"):
                module._optimizer_step()
        else:
            module._optimizer_step()
    assert scheduler.last_epoch == 1 and module.skipped_steps == 3


# --------------------------------------------------------------------------- fit


EXPECTED_METRICS = {
    "train/reward",
    "train/reward/brightness",
    "train/reward/length",
    "train/reward_std",
    "train/kl",
    "train/rollout_kl/plan",
    "train/rollout_kl/image",
    "train/rollout_logp_gap_max",
    "train/loss",
    "train/clip_frac",
    "train/plan_tokens",
    "train/zero_std_frac",
    "time/rollout_s",
    "time/score_s",
    "time/update_s",
    "perf/images_per_s",
}


def _saved(module: BiCoTGRPO) -> dict:
    """What on_save_checkpoint keeps of a checkpoint: the trained weights and the bicot section."""
    checkpoint = {"state_dict": {f"policy.{n}": p.detach() for n, p in module.policy.named_parameters()}}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def test_a_refused_checkpoint_says_how_its_model_differs():
    from bicot.checkpointing import CheckpointMismatchError

    def policy(trainable=("language_model",), **spec):
        return JanusPolicy(tiny=TinyJanusSpec(**spec), trainable=trainable, sampling=SamplingConfig(plan_max_tokens=4))

    saved = _saved(make_module(policy()))
    assert set(saved["state_dict"]) and all(".language_model." in k for k in saved["state_dict"])
    make_module(policy()).check_checkpoint(saved)  # the same model resumes
    other = make_module(policy(("language_model", "generation_head")))
    parts = r"it trained \[language_model\], this run trains \[generation_head, language_model\]"
    with pytest.raises(CheckpointMismatchError, match=parts):
        other.check_checkpoint(saved)
    # written before the source was recorded, and as the CLI reads it (names only, no weights): the same
    old = {"bicot": {k: v for k, v in saved["bicot"].items() if k != "source"} | {"trained": list(saved["state_dict"])}}
    with pytest.raises(CheckpointMismatchError, match=parts):
        other.check_checkpoint(old)
    with pytest.raises(CheckpointMismatchError, match="model source 'TinyJanusSpec.*hidden_size=32.*here 'TinyJanus"):
        make_module(policy(hidden_size=48)).check_checkpoint(saved)


def _rank_stats(rank: int):
    from bicot.loop import UpdateStats

    stats = UpdateStats()
    # rank 0: 10 plan tokens of KL 0.1 each; rank 1: 30 of 0.3; image tokens 100 each, KL 0.2 and 0.4
    stats.add_tokens("kl_plan", 0.1 * 10 if rank == 0 else 0.3 * 30, 10 if rank == 0 else 30)
    stats.add_tokens("kl_image", (0.2 if rank == 0 else 0.4) * 100, 100)
    return stats


def test_rows_are_gathered_in_process_order():
    host = SimpleNamespace(trainer=SimpleNamespace(world_size=2), all_gather=lambda t: torch.stack([t, t + 10]))
    assert BiCoTGRPO.gather_rows(host, torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0, 11.0, 12.0]


def test_token_means_are_merged_over_processes_by_their_sums_and_counts():
    # Rank 0's view of a 2-process step: the strategy's all-reduce (sum) adds rank 1's [K, 2] sums and counts.
    # The real collective runs in tests/e2e/test_fsdp2.py (2 and 4 gloo processes).
    from bicot.loop import TOKEN_MEANS

    other = torch.tensor([_rank_stats(1).token_sums.get(name, (0.0, 0)) for name in TOKEN_MEANS], dtype=torch.float64)
    calls = []

    def reduce(tensor, reduce_op):
        calls.append(reduce_op)
        return tensor + other

    host = SimpleNamespace(device=torch.device("cpu"), trainer=SimpleNamespace(
        world_size=2, strategy=SimpleNamespace(reduce=reduce)))
    merged = BiCoTGRPO._token_means(host, _rank_stats(0))
    assert calls == ["sum"]
    assert merged["kl_plan"] == pytest.approx((1.0 + 9.0) / 40)  # not (0.1 + 0.3) / 2
    assert merged["kl_image"] == pytest.approx(0.3)
    assert merged["kl"] == merged["rollout_kl/plan"] == 0.0  # measured nowhere
    skipped = BiCoTGRPO._token_means(host, None)  # a skipped update still joins the collective
    assert calls == ["sum", "sum"] and skipped["kl_plan"] == pytest.approx(0.3)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def fit(module: BiCoTGRPO, max_steps: int = 2) -> tuple[pl.Trainer, MemoryLogger]:
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=PromptDataModule(train_file=str(TOY_PROMPTS), batch_size=2))
    return trainer, logger


def test_fit_two_steps_logs_metrics_and_trains_only_trainable_parameters():
    policy = make_policy()
    module = make_module(policy, algo=GRPOConfig(num_generations=2, beta=0.01), lr=1e-3, warmup_steps=1)
    before_policy, before_ref = _snapshot(policy), _snapshot(module.reference.model)
    trainer, logger = fit(module)

    assert trainer.global_step == 2
    assert isinstance(module.last_rollout, Rollout)
    assert module.last_rollout.num_rows == 4  # 2 prompts x G = 2
    assert module.last_rollout.rewards is not None and module.last_rollout.ref_image_logp is not None

    logged = [metrics for _, metrics in logger.calls]
    names = set().union(*logged)
    assert EXPECTED_METRICS <= names, EXPECTED_METRICS - names
    steps = [metrics for metrics in logged if "train/reward" in metrics]
    assert len(steps) == 2
    assert steps[-1]["train/reward"] == pytest.approx(float(module.last_rollout.rewards.mean()), abs=1e-6)
    # the mean of the groups' standard deviations (TRL's reward_std), not the spread of the whole batch
    group_stds = group_std(module.last_rollout.global_rewards, 2)
    assert steps[-1]["train/reward_std"] == pytest.approx(float(group_stds.mean()), abs=1e-6)
    assert steps[-1]["train/reward_std"] != pytest.approx(float(module.last_rollout.rewards.std()), abs=1e-6)
    assert steps[-1]["train/plan_tokens"] == pytest.approx(
        float(module.last_rollout.plan_mask.sum(1).float().mean())
    )
    assert all(m["perf/images_per_s"] > 0 and m["time/rollout_s"] > 0 for m in steps)
    # float32 weights and the eager loop: the update scores the sampled tokens as the rollout did
    assert all(m["train/rollout_logp_gap_max"] < 1e-4 for m in steps)
    assert all(0 <= m[f"train/rollout_kl/{level}"] < 1e-8 for m in steps for level in ("plan", "image"))

    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.model.language_model.") for n in trainable)
    after = dict(policy.named_parameters())
    changed = {n for n in trainable if not torch.equal(after[n], before_policy[n])}
    assert changed == trainable
    for name, value in before_policy.items():
        if name not in trainable:
            assert torch.equal(after[name], value), f"frozen {name} changed"
    for name, param in module.reference.model.named_parameters():
        assert torch.equal(param, before_ref[name]), f"reference {name} changed"


def test_fit_logs_the_static_engines_compile_time_and_captures_per_step():
    from modules.engine import RolloutEngine

    policy = JanusPolicy(tiny=TinyJanusSpec(), sampling=SamplingConfig(plan_max_tokens=4, engine="static"))
    policy._engine = RolloutEngine(compile="cudagraphs")
    policy._engine.graphs = StandInGraphs()
    _, logger = fit(make_module(policy, algo=GRPOConfig(num_generations=2, beta=0.0)), max_steps=3)
    steps = [m for _, m in logger.calls if "train/reward" in m]
    captures = [m["perf/engine_captures"] for m in steps]
    # a training rollout frees the buffers for the update (end_rollout): every step captures its windows again
    assert len(steps) == 3 and all(c >= 2 for c in captures)  # at least one window per stage
    assert sum(captures) == policy._engine.stats.captures
    assert all(m["time/engine_compile_s"] > 0 for m in steps)
    # since the last logged step: everything the engine spent, sampling outside training steps included
    assert sum(m["time/engine_compile_s"] for m in steps) == pytest.approx(policy._engine.stats.compile_s, rel=1e-4)
    # the eager loop has no engine to report on
    _, eager = fit(make_module(algo=GRPOConfig(num_generations=2, beta=0.0)), max_steps=1)
    assert not {"time/engine_compile_s", "perf/engine_captures"} & set().union(*(m for _, m in eager.calls))


def test_fit_logs_the_learning_rate_each_step_used():
    # warm-up over 2 steps: step 0 trains at lr * 0.5, step 1 at lr * 1.0
    module = make_module(algo=GRPOConfig(num_generations=2, beta=0.0), lr=1e-3, warmup_steps=2)
    _, logger = fit(module)
    logged = [metrics["train/lr"] for _, metrics in logger.calls if "train/lr" in metrics]
    assert logged == pytest.approx([1e-3 * module._lr_factor(0, 2), 1e-3 * module._lr_factor(1, 2)])


def test_fit_logs_the_rollout_mismatch_of_the_trained_levels_and_nan_for_a_skipped_update():
    # plans are drawn but only image tokens train: no plan key at any step (keys are constant over a run)
    algo = GRPOConfig(num_generations=2, beta=0.0, levels="token")
    module = BiCoTGRPO(make_policy(), RewardEnsemble([NaNOnFirstCall()]), algo=algo)
    _, logger = fit(module, max_steps=1)
    steps = [m for _, m in logger.calls if "train/reward" in m]
    assert len(steps) == 2  # the skipped update, then the one optimizer step
    assert not any("train/rollout_kl/plan" in m or "train/kl_plan" in m for m in steps)  # not a 0: no key
    assert all("train/kl_image" in m for m in steps)
    skipped, trained = steps
    assert math.isnan(skipped["train/rollout_kl/image"]) and math.isnan(skipped["train/rollout_logp_gap_max"])
    assert 0 <= trained["train/rollout_kl/image"] < 1e-8 and trained["train/rollout_logp_gap_max"] < 1e-4


def test_validation_within_a_fit_is_logged_at_the_steps_trained():
    # before the first step (0), then after 2 and 4 steps: at 2 and 4, where the grids of the same weights are
    # drawn (Lightning would log them at 1 and 3, the index of the batch just trained)
    module = make_module(algo=GRPOConfig(num_generations=2, beta=0.0), validate_before_fit=True)

    def evaluate(batch, batch_idx, tally):
        tally.add("val/reward", torch.full((len(batch),), float(module.global_step)))

    module.evaluate = evaluate
    logger = MemoryLogger()
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         val_check_interval=2, num_sanity_val_steps=0, limit_val_batches=1)
    data = PromptDataModule(train_file=str(TOY_PROMPTS), val_file=str(TOY_PROMPTS), batch_size=2)
    trainer.fit(module, datamodule=data)
    logged = [(step, metrics["val/reward"]) for step, metrics in logger.calls if "val/reward" in metrics]
    assert logged == [(0, 0.0), (2, 2.0), (4, 4.0)]
    assert trainer.callback_metrics["val/reward"] == 4.0  # still there for a ModelCheckpoint to monitor


@pytest.mark.parametrize("global_step, validates", [(0, True), (3, False)])
def test_validate_before_fit_scores_the_starting_policy_once_not_again_on_resume(global_step, validates):
    module = make_module(validate_before_fit=True)
    scored = []

    def evaluate(batch, batch_idx, tally):
        scored.append(batch_idx)
        tally.add("val/reward", torch.ones(len(batch)))

    module.evaluate = evaluate
    data = PromptDataModule(train_file=str(TOY_PROMPTS), val_file=str(TOY_PROMPTS), batch_size=2)
    data.setup("fit")
    logger = MemoryLogger()
    module._trainer = SimpleNamespace(datamodule=data, global_step=global_step, is_global_zero=True, loggers=[logger])
    module.on_train_start()
    assert bool(scored) == validates and bool(logger.calls) == validates  # a resume (step 3): nothing again
