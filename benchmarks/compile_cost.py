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

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import contexts, janus_at_shape, timed  # noqa: E402

from modules.engine import COMPILE_MODES, RolloutEngine  # noqa: E402
from modules.janus_ops import RowNoise  # noqa: E402


def cold_caches(root: Path, name: str) -> None:
    """Forget everything compiled so far: dynamo's caches, inductor's on-disk and in-process code caches."""
    from torch._inductor import codecache

    torch._dynamo.reset()
    cache = root / name
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    for kind in ("PyCodeCache", "CppCodeCache", "CppPythonBindingsCodeCache", "CppWrapperCodeCache"):
        getattr(codecache, kind).cache_clear()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["toy", "1b", "7b"], default="toy")
    parser.add_argument("--prompts", type=int, default=None, help="default: 16 on GPU, 1 on CPU (rows double with CFG)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--image-tokens", type=int, default=None, help="default: the model's (64 toy, 576)")
    parser.add_argument("--compile", default="fused,default", help=f"comma-separated, of {', '.join(COMPILE_MODES)}")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, else fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for mode in args.compile.split(","):
        if mode not in COMPILE_MODES:
            parser.error(f"--compile: unknown mode {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    gpu = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.prompts = args.prompts or (16 if gpu else 1)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = janus_at_shape(args.shape, device, getattr(torch, args.dtype))
    n_tokens = args.image_tokens or model.config.vision_config.num_image_tokens
    ids, mask, uncond = contexts(model, args.prompts, args.prompt_tokens, args.seed)
    root = Path(tempfile.mkdtemp(prefix="bicot_compile_cost_"))
    cold_caches(root, "start-up")
    torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))  # torch's one-off start-up
    first_tokens = None
    for mode in args.compile.split(","):
        cold_caches(root, mode)
        counters.clear()
        engine = RolloutEngine(compile=mode)

        def call(engine=engine):
            noise = RowNoise(torch.Generator(device=device).manual_seed(args.seed))
            return engine.sample_image_tokens(model, ids, mask, n_tokens, uncond, 5.0, noise=noise)

        first_s, _, out = timed(call, device)
        second_s, _, _ = timed(call, device)
        first_tokens = out.tokens if first_tokens is None else first_tokens
        print(json.dumps(dict(
            measure="compile_cost", mode=engine.mode(device), shape=args.shape, dtype=args.dtype,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            rows=2 * args.prompts, image_tokens=n_tokens, compile_s=round(engine.stats.compile_s, 2),
            first_call_s=round(first_s, 2), second_call_s=round(second_s, 2),
            ms_per_step=round(1e3 * second_s / n_tokens, 3), variants=engine.stats.variants,
            captures=engine.stats.captures, graphs=counters["stats"]["unique_graphs"],
            same_tokens=torch.equal(out.tokens, first_tokens),
        )), flush=True)


if __name__ == "__main__":
    main()
