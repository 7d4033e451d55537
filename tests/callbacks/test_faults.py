"""GracefulStop: a Ctrl+C stops every process at one step boundary, the only place it writes a checkpoint."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from callbacks.faults import GracefulStop


def trainer_of(world_size: int, others_interrupted: bool) -> SimpleNamespace:
    """A trainer of ``world_size`` processes whose other processes were (or were not) interrupted."""

    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:  # Lightning's signature
        decisions = [decision, *[others_interrupted] * (world_size - 1)]
        return min(decisions) if all else max(decisions)

    strategy = SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision)
    return SimpleNamespace(world_size=world_size, strategy=strategy)


def test_first_ctrl_c_stops_at_the_step_boundary():
    stop = GracefulStop()
    trainer = trainer_of(1, others_interrupted=False)
    stop.on_train_start(trainer, None)
    try:
        stop.on_train_batch_end(trainer, None, None, None, 0)  # not interrupted: goes on
        stop._on_sigint(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            stop.on_train_batch_end(trainer, None, None, None, 1)
    finally:
        stop._restore()


def test_a_process_stops_with_the_one_that_was_interrupted():
    """The Ctrl+C reached another process before this one passed the step boundary: both stop there (and both
    save their part of the checkpoint), rather than this one going on into a step the other never joins."""
    stop = GracefulStop()
    trainer = trainer_of(2, others_interrupted=True)
    with pytest.raises(KeyboardInterrupt):
        stop.on_train_batch_end(trainer, None, None, None, 0)
    assert stop.interrupted  # so on_exception saves this process's share of last.ckpt too
    calm = GracefulStop()
    calm.on_train_batch_end(trainer_of(2, others_interrupted=False), None, None, None, 0)  # nobody: goes on
    assert not calm.interrupted


def stopping_trainer() -> SimpleNamespace:
    """A one-process fit whose checkpoints are recorded, not written."""
    saved = []
    return SimpleNamespace(
        world_size=1, state=SimpleNamespace(fn="fit"), checkpoint_callbacks=[], loggers=[],
        is_global_zero=True, save_checkpoint=saved.append, saved=saved,
    )


def test_a_second_ctrl_c_writes_no_checkpoint_mid_step(tmp_path):
    """The first Ctrl+C waits for the step boundary; a second one lands inside a step (say between the
    optimizer's step and the scheduler's), a state not to resume from: last.ckpt stays as it was."""
    stop = GracefulStop(dirpath=str(tmp_path))
    trainer = stopping_trainer()
    stop.on_train_start(trainer, None)
    stop._on_sigint(signal.SIGINT, None)  # the first Ctrl+C: stop after this step
    stop.on_exception(trainer, None, KeyboardInterrupt())  # the second, before the step ended
    assert trainer.saved == []
    clean = GracefulStop(dirpath=str(tmp_path))  # the first Ctrl+C alone: saved at the boundary
    clean.on_train_start(trainer, None)
    clean._on_sigint(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt) as raised:
        clean.on_train_batch_end(trainer, None, None, None, 0)
    clean.on_exception(trainer, None, raised.value)
    assert trainer.saved == [tmp_path / "last.ckpt"]
