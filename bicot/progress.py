"""The training progress bar: the run's optimizer steps against ``trainer.max_steps``, not Lightning's ``Epoch 0/-2``.

A bicot run ends at ``max_steps`` with ``max_epochs: -1``, and an epoch is one pass over the prompt file, so
Lightning's bar reads ``Epoch 0/-2`` (``max_epochs - 1``) and counts the batches of the current pass only; it
also shows ``v_num``, the tail of the MLflow run id. These bars describe the training bar as
``Epoch 1 · step 45/300`` (the step is ``trainer.global_step``, what ``max_steps`` is compared with; an epoch
total only where ``max_epochs`` bounds the run) and leave ``v_num`` out. Validation, test and predict bars are
Lightning's.

The CLI puts one in where Lightning would add its default bar (:func:`step_bar_for`); a progress bar named in
``trainer.callbacks`` is kept as it is. (The CLI's own display, so it lives beside the CLI: ``bicot/`` does not
import ``callbacks/``.)
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


def train_description(epoch: int, max_epochs: int | None, step: int, max_steps: int) -> str:
    """``Epoch 1 · step 45/300``; ``Epoch 1/9`` where ``max_epochs`` bounds the run; no step part without
    ``max_steps`` (``-1``)."""
    text = f"Epoch {epoch}"
    if max_epochs is not None and max_epochs >= 0:
        text += f"/{max_epochs - 1}"
    if max_steps is not None and max_steps > 0:
        text += f" · step {step}/{max_steps}"
    return text


class _StepDescription:
    """What both bars share: the description from the trainer's counters, and no ``v_num``."""

    def _describe(self, trainer) -> str:
        return train_description(trainer.current_epoch, trainer.max_epochs, trainer.global_step, trainer.max_steps)

    @property
    def total_train_batches(self) -> int | float:
        """The batches this pass over the prompts will run: Lightning's bound (the pass's batches, or the steps
        left to ``max_steps``) counted from the pass's start, so that a resumed run's bar, whose batch index goes
        on from the restored one, ends at its total; and with ``mu`` optimizer steps per batch (bicot's
        ``model.algo.mu``), steps left are ``mu`` times the batches left."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if trainer.max_epochs != -1 or trainer.max_steps is None or trainer.max_steps <= 0:
            return batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this pass's batches so far
        per_batch = max(int(getattr(getattr(trainer.lightning_module, "algo", None), "mu", 1)), 1)
        steps_left = max(trainer.max_steps - trainer.global_step, 0)
        return min(batches, done + -(-steps_left // per_batch))

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class StepRichProgressBar(_StepDescription, RichProgressBar):
    """Lightning's rich bar with the step description (see the module docstring)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = self._describe(self.trainer)
        # as Lightning's: padded to the validation bar's description, so the two do not flicker
        return f"{text:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
            self.refresh()


class StepTQDMProgressBar(_StepDescription, TQDMProgressBar):
    """Lightning's tqdm bar (where ``rich`` is not installed) with the step description."""

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        # a run resumed mid-pass gets no on_train_epoch_start from Lightning, so its bar would have no total
        self.train_progress_bar.total = convert_inf(self.total_train_batches)
        self.train_progress_bar.set_description(self._describe(trainer))

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self._describe(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._train_progress_bar is not None:  # (the property raises where no bar was made)
            self._train_progress_bar.set_description(self._describe(trainer), refresh=False)


def step_bar_for(default: ProgressBar) -> ProgressBar | None:
    """The step bar that replaces Lightning's default ``default`` bar, or ``None`` where ``default`` is not one
    of Lightning's two default bars (a subclass or another bar: someone chose it)."""
    if type(default) is RichProgressBar:
        return StepRichProgressBar()
    if type(default) is TQDMProgressBar:
        return StepTQDMProgressBar()
    return None


def steps_trained(trainer) -> int:
    """The batches trained so far: the step at which a grid, a validation or an export of the current weights is
    logged (the validation before the first step is at 0). Where Lightning writes checkpoints and validates within
    a fit, its logging step is still that of the batch just trained; this count already includes it."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
