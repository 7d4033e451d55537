"""How the rollout engine's decode step is compiled and captured: the probe that asks whether inductor compiles on a
device, and CUDA graphs captured by hand (warm-up on a side stream, capture, replay, re-capture when the weights or
buffers move).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

# Each (rows, capacity, window, settings) variant of a step is one dynamo recompile of the same code.
RECOMPILE_LIMIT = 64


def inductor_compiles(device: torch.device) -> bool:
    """Whether inductor compiles and runs a small kernel on ``device``; warns with the error where it cannot."""
    try:
        probe = torch.compile(_probe, fullgraph=True, dynamic=False)
        x = torch.arange(8, dtype=torch.float32, device=device)
        if not torch.equal(probe(x).cpu(), _probe(x).cpu()):
            raise RuntimeError("the compiled probe kernel gave other values than eager")
        return True
    except Exception as error:  # a missing Triton or C compiler surfaces as many exception types
        warnings.warn(
            f"engine compile='auto': inductor cannot compile on {device} ({first_line(error)}); "
            "using 'cudagraphs' (hand-captured, uncompiled steps) instead of 'fused'. Set "
            "sampling.engine_compile explicitly to choose.",
            stacklevel=3,
        )
        return False


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _probe(x: torch.Tensor) -> torch.Tensor:
    # a pointwise chain and a reduction, integer-valued: exact in float32 whatever the kernel's order
    y = (x * 2 + 1) * (x - 3)
    return y - y.amax()


def raise_recompile_limit() -> None:
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)


class CudaGraphs:
    """How ``compile="cudagraphs"`` warms a step up and captures it (swappable: the CPU tests use a stand-in).

    All graphs of an engine share one memory pool: they run one after another and keep nothing alive
    between replays (every result goes into the engine's buffers), so their temporaries can share memory.
    """

    def __init__(self) -> None:
        self.pool = None

    @staticmethod
    def available(device: torch.device) -> bool:
        """Whether steps on ``device`` can be captured (``compile="fused"`` runs uncaptured where not)."""
        return device.type == "cuda"

    def warmup(self, run, device: torch.device) -> None:
        """Run ``run()`` once on a side stream, as CUDA graph capture asks (lazy library set-up happens here)."""
        with _side_stream(device):
            run()

    def capture(self, run, device: torch.device):
        """Record ``run()`` into a CUDA graph without executing it; returns the graph's ``replay``.

        ``torch.cuda.graph``'s steps by hand, minus its ``empty_cache``: captures happen at every rollout
        when the buffers are released between rollouts, and emptying the allocator each time would cost
        fresh ``cudaMalloc`` calls afterwards.
        """
        with _side_stream(device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(device)
            graph.capture_begin(pool=self.pool)
            try:
                run()
            finally:
                graph.capture_end()
        return graph.replay


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Inside: a fresh side stream that waits for the current one (and is waited for on exit), and autocast
    without its cast cache. Warm-up and capture both run there."""
    if device.type != "cuda":
        raise RuntimeError(f"engine compile='cudagraphs' needs a CUDA device, got {device}; use 'off' or 'default'")
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side), _uncached_autocast(device):
        yield
    current.wait_stream(side)


def _uncached_autocast(device: torch.device):
    """Autocast as it is, without its weight-cast cache: a captured graph must do its own casts.

    A cast cached outside the graph is freed when the caller's autocast region ends, and the graph would
    go on reading it; cast inside the graph, the bf16 copy of each weight is remade at every replay.
    """
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)


class CapturedStep:
    """One step variant under ``compile="cudagraphs"``: warm-up, capture, then replays.

    The first call runs the step eagerly on a side stream: that is both the warm-up capture needs and the
    step itself. The second call captures the step (capture executes nothing) and replays it once; later
    calls replay. When the weights or buffers sit at other addresses than at capture, the next call
    captures again.
    """

    def __init__(self, step, graphs: CudaGraphs) -> None:
        self.step, self.graphs = step, graphs
        self.warm = False
        self.replay = None
        self.addresses: tuple = ()

    def drop(self) -> None:
        """Forget the graph (its buffers are gone); the next call captures again."""
        self.replay, self.addresses = None, ()

    def ready(self, addresses: tuple) -> bool:
        """Whether the next call only replays.

        ``addresses`` is one tuple per sampling call (:meth:`modules.engine.RolloutEngine.bind`): compared by value once per
        call, then by identity at every step of it.
        """
        if self.replay is None:
            return False
        if self.addresses is not addresses:
            if self.addresses != addresses:
                return False
            self.addresses = addresses
        return True

    def __call__(self, state: dict, addresses: tuple, ready: bool) -> int:
        """Run one step (``ready``: what :meth:`ready` said); returns 1 when it captured a graph, else 0."""
        device = state["hidden"].device
        if ready:
            self.replay()
            return 0
        if not self.warm:
            self.graphs.warmup(lambda: self.step(state), device)
            self.warm = True
            return 0
        self.replay = self.graphs.capture(lambda: self.step(state), device)
        self.addresses = addresses
        self.replay()
        return 1
