"""PhaseMemory: peak memory is reset and read around each phase, the wrapper goes away, CPU logs nothing."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from toyfit import fit_args, only_run, quiet_fit_environment

from bicot.cli import BiCoTCLI
from callbacks.phase_memory import GIB, PhaseMemory, phase_with_memory


class FakeCuda:
    """Stands in for torch.cuda's peak counters: each phase allocates a known amount."""

    def __init__(self) -> None:
        self.peak = 0
        self.resets = 0

    def reset_peak_memory_stats(self, device) -> None:
        self.resets += 1
        self.peak = 0

    def max_memory_allocated(self, device) -> int:
        return self.peak


@contextmanager
def timed_phase(name, times):
    times[name] = "timed"
    yield


def test_wrapper_resets_and_reads_the_peak_per_phase(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    peaks, times = {}, {}
    phase = phase_with_memory(timed_phase, lambda: torch.device("cuda", 0), peaks)
    for name, allocated in (("rollout", 3 * GIB), ("score", GIB), ("update", 2 * GIB)):
        with phase(name, times):
            fake.peak = allocated  # a later, smaller phase must not report an earlier peak
    assert peaks == {"rollout": 3 * GIB, "score": GIB, "update": 2 * GIB}
    assert fake.resets == 3
    assert times == {"rollout": "timed", "score": "timed", "update": "timed"}  # the original still runs


def test_wrapper_off_cuda_only_times(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: pytest.fail("read on CPU"))
    peaks, times = {}, {}
    with phase_with_memory(timed_phase, lambda: torch.device("cpu"), peaks)("rollout", times):
        pass
    assert peaks == {} and times == {"rollout": "timed"}


def test_fit_on_cpu_logs_no_memory_and_restores_the_method(toy_run):
    assert not any(name.startswith("memory/") for name in toy_run.run.data.metrics)
    assert "_phase" not in vars(toy_run.module)  # the instance wrapper is gone after teardown
    assert any(isinstance(cb, PhaseMemory) for cb in toy_run.module.trainer.callbacks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_metrics_on_gpu(tmp_path):
    with quiet_fit_environment():
        BiCoTCLI(args=fit_args(tmp_path, None, "--trainer.accelerator=gpu"))
    client, run = only_run(tmp_path)
    for phase in ("rollout", "score", "update"):
        history = client.get_metric_history(run.info.run_id, f"memory/{phase}_peak_gib")
        assert history and all(m.value > 0 for m in history), phase
