"""SampleGrid: every N steps, draw G samples for a fixed set of prompts and log the grid to MLflow."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from bicot import loop
from bicot.parallel import gathered
from bicot.rollout import Rollout
from callbacks._run import find_run, logging_step
from callbacks.grid import Caption, GridLayout, draw_grid
from datamodules.records import PromptRecord

SPLITS = ("val", "train")


class SampleGrid(pl.Callback):
    """Logs ``samples/step_XXXXXX.png`` and ``.json`` plus rows of an MLflow table, for fixed prompts.

    The grid is drawn at the start of every ``every_n_steps``-th batch, so the grid of step ``s`` comes
    from the same weights as ``train/*`` of step ``s``; step 0 shows the starting policy. The prompts,
    the seed and the group size never change, so grids of different steps compare like for like.
    Sampling uses the policy's own rollout (``bicot.loop.rollout_phase``) and the module's reward
    ensemble (``bicot.loop.score_phase`` without the reference), with its own random stream: the
    training run draws exactly the same samples with or without this callback. A resumed run does not draw
    again the grid the run already holds for its first step (the one drawn after the last step before it).

    Args:
        every_n_steps: draw when the logging step is a multiple of this.
        num_prompts: take the first ``num_prompts`` prompts of ``split``.
        prompts: explicit prompt texts instead (overrides ``num_prompts`` and ``split``); a text found in a
            loaded split keeps that record's metadata.
        split: ``val`` or ``train``; ``None`` takes the validation prompts, else the training ones.
        images_per_prompt: G of the grid; ``None`` uses the algorithm's ``num_generations``.
        seed: the sampling seed, the same at every step.
        at_end: also draw after the last step (the trained policy).
        table_file: the MLflow table that gains one row per sample (``None``: no table).
        layout: sizes of the grid (see :class:`callbacks.grid.GridLayout`).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_prompts: int = 4,
        prompts: list[str] | None = None,
        split: str | None = None,
        images_per_prompt: int | None = None,
        seed: int = 1234,
        at_end: bool = True,
        table_file: str | None = "samples/table.json",
        layout: GridLayout | None = None,
    ) -> None:
        if every_n_steps < 1 or num_prompts < 1:
            raise ValueError(
                f"every_n_steps and num_prompts must be >= 1, got {every_n_steps}, {num_prompts}"
            )
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or null, got {split!r}")
        if images_per_prompt is not None and images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1 or null, got {images_per_prompt}")
        if prompts is not None and not prompts:
            raise ValueError("prompts must name at least one prompt (or be null)")
        self.every_n_steps, self.num_prompts, self.split = every_n_steps, num_prompts, split
        self.prompts = list(prompts) if prompts is not None else None
        self.images_per_prompt, self.seed, self.at_end = images_per_prompt, seed, at_end
        self.table_file = table_file
        self.layout = layout or GridLayout()
        self._records: list[PromptRecord] | None = None
        self._last_step: int | None = None
        self._run_checked = False

    # ---- hooks ---------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        step = logging_step(trainer)
        if step % self.every_n_steps == 0 and self.due(trainer, step):
            self.log_samples(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = logging_step(trainer)
        if self.at_end and self.due(trainer, step):
            self.log_samples(trainer, pl_module, step)

    def due(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether the grid of ``step`` is still to draw: not drawn by this process, nor, for the first grid
        of a process, already in the run. A resumed run starts at the step where the stretch before it drew
        its last grid; drawing it again would add that step's rows to the table a second time."""
        if step == self._last_step:
            return False
        if not self._run_checked:
            self._run_checked = True
            run = find_run(trainer)
            name = f"{artifact_name(step)}.json"
            logged = run is not None and any(
                a.path == name for a in run.client.list_artifacts(run.run_id, "samples")
            )
            # every process samples (a collective under FSDP2) or none does: rank 0's run decides
            if trainer.strategy.broadcast(logged, src=0):
                self._last_step = step
                return False
        return True

    # ---- work ----------------------------------------------------------------------------------
    def fixed_prompts(self, trainer: pl.Trainer) -> list[PromptRecord]:
        """The grid's prompt records: explicit texts, or the first ``num_prompts`` of a loaded split."""
        if self._records is not None:
            return self._records
        loaded = getattr(getattr(trainer, "datamodule", None), "records", None) or {}
        if self.prompts is not None:
            # a text that is one of the loaded prompts keeps its metadata (experts such as the toy ORM need it)
            known = {r.prompt: r for records in loaded.values() for r in records or ()}
            self._records = [known.get(p, PromptRecord(prompt=p)) for p in self.prompts]
            return self._records
        splits = [self.split] if self.split is not None else list(SPLITS)
        for split in splits:
            if loaded.get(split):
                self._records = list(loaded[split][: self.num_prompts])
                return self._records
        raise ValueError(
            f"SampleGrid found no {' or '.join(splits)} prompts on the datamodule; set its prompts: [...]"
        )

    @torch.no_grad()
    def sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Rollout:
        """One scored rollout of the fixed prompts (every rank runs it: FSDP2 gathers collectively)."""
        records = self.fixed_prompts(trainer)
        group = self.images_per_prompt or pl_module.algo.num_generations
        rows = len(records) * group
        # the whole grid on every rank, all from one stream: no rank-dependent slicing, same samples
        placement = loop.RowPlacement(self.seed, rows, 0)
        with gathered(pl_module.policy.model):
            rollout = loop.rollout_phase(pl_module.policy, records, group, pl_module.template, placement)
        loop.score_phase(rollout, pl_module.rewards, pl_module.algo, pl_module.policy, None)
        return rollout

    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Sample, then (rank 0) log the PNG, the JSON and the table rows of ``step``."""
        self._last_step = step
        rollout = self.sample(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        run = find_run(trainer)
        if run is None:
            rank_zero_warn("SampleGrid: no MLFlowLogger on the trainer, so sample grids are not logged")
            return
        captions = captions_of(rollout)
        grid = draw_grid(rollout.images.cpu().numpy(), captions, rollout.group_size, self.layout)
        name = artifact_name(step)
        run.client.log_image(run.run_id, grid, artifact_file=f"{name}.png")
        run.client.log_dict(run.run_id, self.summary(rollout, step), f"{name}.json")
        if self.table_file is not None:
            log_table_quietly(run.client, run.run_id, table_rows(rollout, step), self.table_file)

    def summary(self, r: Rollout, step: int) -> dict:
        """The JSON next to the grid: prompts ``[P]`` and, prompt-major ``[P*G]``, plans, rewards, advantages."""
        return {
            "step": step,
            "seed": self.seed,
            "group_size": r.group_size,
            "prompts": [rec.prompt for rec in r.records[:: r.group_size]],
            "plans": r.plans,
            "rewards": r.rewards.tolist(),
            "advantages": r.advantages.tolist(),
            "reward_per_expert": {name: s.tolist() for name, s in r.reward_per_expert.items()},
        }


def artifact_name(step: int) -> str:
    """The grid's artifact of ``step`` without its extension: ``samples/step_XXXXXX``."""
    return f"samples/step_{step:06d}"


def log_table_quietly(client, run_id: str, data: dict[str, list], artifact_file: str) -> None:
    """``MlflowClient.log_table`` without MLflow's artifact-download progress bar.

    Appending to a table downloads the rows logged so far; MLflow would print a "Downloading artifacts"
    bar for it at every grid, in the middle of the training output.
    """
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        client.log_table(run_id, data, artifact_file)
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def captions_of(r: Rollout) -> list[Caption]:
    """One caption per row of a scored rollout."""
    plans: Sequence[str | None] = r.plans if r.plans is not None else [None] * r.num_rows
    return [
        Caption(
            prompt=r.records[i].prompt,
            plan=plans[i],
            reward=float(r.rewards[i]),
            advantage=float(r.advantages[i]),
            per_expert={name: float(s[i]) for name, s in r.reward_per_expert.items()},
        )
        for i in range(r.num_rows)
    ]


def table_rows(r: Rollout, step: int) -> dict[str, list]:
    """Columns of the MLflow table: step, prompt, sample, plan, reward, advantage, ``reward/<expert>``."""
    columns: dict[str, list] = {
        "step": [step] * r.num_rows,
        "prompt": [rec.prompt for rec in r.records],
        "sample": [i % r.group_size for i in range(r.num_rows)],
        "plan": list(r.plans) if r.plans is not None else [""] * r.num_rows,
        "reward": r.rewards.tolist(),
        "advantage": r.advantages.tolist(),
    }
    for name, scores in r.reward_per_expert.items():
        columns[f"reward/{name}"] = scores.tolist()
    return columns
