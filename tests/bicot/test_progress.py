"""The training bar counts the run's steps against max_steps (no ``Epoch 0/-2``, no ``v_num``); the CLI puts it in
place of Lightning's default bar and leaves a bar the config names alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from mlflow_store import store_uri

from bicot.cli import BiCoTCLI
from bicot.progress import StepRichProgressBar, StepTQDMProgressBar, step_bar_for, train_description

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "e2e" / "configs" / "tiny.yaml"  # a random tiny Janus: nothing to load


@pytest.mark.parametrize(("epoch", "max_epochs", "step", "max_steps", "text"), [
    (0, -1, 3, 300, "Epoch 0 · step 3/300"),  # a bicot run: bounded by steps only
    (2, None, 45, 300, "Epoch 2 · step 45/300"),
    (1, 10, 7, -1, "Epoch 1/9"),  # bounded by epochs only: Lightning's own description
    (1, 10, 7, 300, "Epoch 1/9 · step 7/300"),
    (0, -1, 0, -1, "Epoch 0"),
])
def test_train_description(epoch, max_epochs, step, max_steps, text):
    assert train_description(epoch, max_epochs, step, max_steps) == text


class _Counter(LightningModule):
    """Two batches per epoch; one optimizer step per batch (manual, as bicot's)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(2), batch_size=1)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward((self.weight - batch).square())
        optimizer.step()
        self.log("train/loss", 1.0, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("bar_class", [StepRichProgressBar, StepTQDMProgressBar])
def test_the_bar_shows_the_run_steps_during_a_fit_and_no_version(tmp_path, bar_class):
    bar = bar_class()
    seen = []

    class Spy(_Counter):
        def on_train_batch_end(self, *args) -> None:  # after the callbacks' hooks: what the bar shows now
            seen.append(describe(bar))

    trainer = Trainer(max_steps=3, max_epochs=-1, callbacks=[bar], logger=CSVLogger(tmp_path),
                      default_root_dir=tmp_path, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Spy())
    # updated at every batch, not only when an epoch starts
    assert seen == ["Epoch 0 · step 1/3", "Epoch 0 · step 2/3", "Epoch 1 · step 3/3"]
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert "train/loss" in metrics and "v_num" not in metrics


class _FourBatches(_Counter):
    """Four batches per epoch; ``algo.mu`` optimizer steps per batch, as bicot's ``model.algo.mu``."""

    def __init__(self, mu: int = 1) -> None:
        super().__init__()
        self.algo = type("Algo", (), {"mu": mu})()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4), batch_size=1)

    def training_step(self, batch, batch_idx):
        for _ in range(self.algo.mu):
            super().training_step(batch, batch_idx)


def counts(bar) -> tuple[int, int | None]:
    """What the training bar shows as ``n/total``."""
    if isinstance(bar, RichProgressBar):
        task = bar.progress.tasks[bar.train_progress_bar_id]
        return int(task.completed), None if task.total is None else int(task.total)
    return bar.train_progress_bar.n, bar.train_progress_bar.total


def _fit(tmp_path, bar, module, max_steps, ckpt_path=None, checkpoints=None):
    trainer = Trainer(max_steps=max_steps, max_epochs=-1, callbacks=[bar, *(checkpoints or [])],
                      logger=CSVLogger(tmp_path), default_root_dir=tmp_path, enable_model_summary=False,
                      enable_checkpointing=checkpoints is not None)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("bar_class", [StepRichProgressBar, StepTQDMProgressBar])
def test_the_bar_ends_at_its_total_after_a_resume_mid_pass_and_with_several_steps_per_batch(tmp_path, bar_class):
    from lightning.pytorch.callbacks import ModelCheckpoint

    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    _fit(tmp_path, bar_class(), _FourBatches(), 2, checkpoints=[every])
    # resumed after batch 2 of 4: Lightning's index goes on from 2, so the total counts from the pass's start
    # (it read 4/1 with rich, 4/? with tqdm)
    bar = bar_class()
    trainer = _fit(tmp_path, bar, _FourBatches(), 4, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert trainer.global_step == 4 and counts(bar) == (4, 4)
    assert describe(bar) == "Epoch 0 · step 4/4"
    # two optimizer steps per batch: max_steps 4 is 2 batches (it read 2/4)
    bar = bar_class()
    trainer = _fit(tmp_path / "mu", bar, _FourBatches(mu=2), 4)
    assert trainer.global_step == 4 and counts(bar) == (2, 2)


def describe(bar) -> str:
    if isinstance(bar, RichProgressBar):
        return bar.progress.tasks[bar.train_progress_bar_id].description.strip()
    return bar.train_progress_bar.desc.rstrip(": ")


def test_only_lightnings_own_default_bars_are_replaced():
    assert type(step_bar_for(RichProgressBar())) is StepRichProgressBar
    assert type(step_bar_for(TQDMProgressBar())) is StepTQDMProgressBar
    assert step_bar_for(StepTQDMProgressBar()) is None

    class Mine(TQDMProgressBar):
        pass

    assert step_bar_for(Mine()) is None


def _cli(workdir, *extra):
    """The ``bicot fit`` CLI on the tiny config, parsed and instantiated, not run (``enable_progress_bar`` is false
    there unless ``extra`` says otherwise)."""
    workdir.mkdir()
    args = ["-c", str(TINY), f"--data.train_file={REPO / 'datamodules' / 'fixtures' / 'toy_prompts.jsonl'}",
            f"--trainer.logger.init_args.tracking_uri={store_uri(workdir)}",
            f"--trainer.default_root_dir={workdir}", *extra]
    return BiCoTCLI(args=args, run=False)


def test_the_cli_trainer_has_the_step_bar_unless_the_config_names_a_bar_or_turns_it_off(tmp_path):
    cli = _cli(tmp_path / "default", "--trainer.enable_progress_bar=true")
    bars = [c for c in cli.trainer.callbacks if isinstance(c, (RichProgressBar, TQDMProgressBar))]
    assert len(bars) == 1 and type(bars[0]) in (StepRichProgressBar, StepTQDMProgressBar)
    assert cli.trainer.progress_bar_callback is bars[0]

    named = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 5}}
    overlay = tmp_path / "named.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [named]}}))
    cli = _cli(tmp_path / "named", "-c", str(overlay), "--trainer.enable_progress_bar=true")
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar
    assert cli.trainer.progress_bar_callback.refresh_rate == 5

    cli = _cli(tmp_path / "off")  # the tiny config turns the bar off
    assert cli.trainer.progress_bar_callback is None
