"""What each engine mode costs before its first fast step: compile and capture seconds, cold caches, one process.

Image-token sampling with CFG at a real shape (random weights), as in ``rollout.py``. For each mode, in
turn and in the same process: dynamo's caches reset, a fresh inductor and Triton cache directory, the
in-process compiled-code caches emptied. Then two sampling calls: the first compiles or captures every
window of the shape, the second only runs. One JSON line per mode:

    nice python benchmarks/compile_cost.py --shape 1b --image-tokens 130 --compile fused,default   # CPU: fp32
    python benchmarks/compile_cost.py --shape 1b --compile cudagraphs,fused,reduce-overhead          # GPU: bf16

``compile_s`` is what the engine counts as compile and capture (the first calls of each step variant);
``first_call_s - second_call_s`` is the whole extra cost of the first rollout. ``graphs`` counts the graphs
dynamo compiled; ``same_tokens`` compares with the first mode's tokens (float32: expect true).
A trivial compile runs first, so that torch's one-off start-up is not charged to the first mode.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import Bench, checked_args, device_name, shape_arguments, timed  # noqa: E402


def cold_caches(root: Path, name: str) -> None:
    """Forget everything compiled so far: dynamo's caches, inductor's on-disk and in-process code caches."""
    from torch._inductor import codecache

    torch._dynamo.reset()
    cache = root / name
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    for kind in ("PyCodeCache", "CppCodeCache", "CppPythonBindingsCodeCache", "CppWrapperCodeCache"):
        getattr(codecache, kind).cache_clear()


def main() -> None:
    parser = shape_arguments(__doc__, compile_default="fused,default")
    b = Bench.build(checked_args(parser, prompts=(16, 1), real_shapes_on_cpu=True))
    args, device, n_tokens = b.args, b.device, b.n_tokens
    root = Path(tempfile.mkdtemp(prefix="bicot_compile_cost_"))
    cold_caches(root, "start-up")
    torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))  # torch's one-off start-up
    first_tokens = None
    for spec, engine in b.engines().items():
        cold_caches(root, spec)
        counters.clear()
        call = b.sampler(engine.sample_image_tokens)
        first_s, _, out = timed(call, device)
        second_s, _, _ = timed(call, device)
        first_tokens = out.tokens if first_tokens is None else first_tokens
        print(json.dumps(dict(
            measure="compile_cost", mode=engine.mode(device), attention=engine.attention, shape=args.shape,
            dtype=args.dtype,
            device=device_name(device),
            rows=2 * args.prompts, image_tokens=n_tokens, compile_s=round(engine.stats.compile_s, 2),
            first_call_s=round(first_s, 2), second_call_s=round(second_s, 2),
            ms_per_step=round(1e3 * second_s / n_tokens, 3), variants=engine.stats.variants,
            captures=engine.stats.captures, graphs=counters["stats"]["unique_graphs"],
            same_tokens=torch.equal(out.tokens, first_tokens),
        )), flush=True)


if __name__ == "__main__":
    main()
