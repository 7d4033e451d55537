"""A stand-in for the engine's CUDA-graph backend (``modules.engine_capture.CudaGraphs``), so that captured steps run
on CPU: a "capture" records the step without running it, a replay runs it."""

from __future__ import annotations


class StandInGraphs:
    """``CudaGraphs`` on CPU, counting its warm-ups and captures."""

    def __init__(self) -> None:
        self.warmups, self.captures = 0, 0

    @staticmethod
    def available(device) -> bool:
        return True

    def warmup(self, run, device) -> None:
        self.warmups += 1
        run()

    def capture(self, run, device):
        self.captures += 1
        return run
