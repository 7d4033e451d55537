"""Where one image-token step of the static engine spends its time: kernels per step, busy time, top kernels.

Image-token sampling with CFG at a real shape (random weights), as in ``rollout.py``. Each mode first runs
one whole sampling call (compiles and captures happen there), then one call of ``--image-tokens`` steps
runs under ``torch.profiler``. One JSON line per mode:

    python benchmarks/profile_step.py --shape 1b --compile cudagraphs,fused     # GPU
    nice python benchmarks/profile_step.py --shape toy --compile off,fused      # CPU (aten operators)

``kernels_per_step`` and ``busy_ms_per_step`` count the GPU kernels of the profiled call, divided by its
steps. On CPU they count aten operators (nested ones included) and their self time; inductor's own C++
kernels are not among them, so there it is a smoke test more than a measurement. ``wall_ms_per_step`` is
that call's wall time (the profiler adds some). ``busy / wall`` near 1 means the step is bound by its kernels; far below 1, by launches or the host.
``top`` lists the kernels with the most time per step. Kernels replayed from a CUDA graph appear only where
the profiler traces graph nodes; ``kernels_per_step: 0`` under a captured mode means it did not (profile
``off`` or ``fused`` uncaptured instead: ``--no-capture``). The prefill is in the profiled call too; with
``--image-tokens`` in the hundreds it is a small part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import contexts, janus_at_shape  # noqa: E402

from modules.engine import COMPILE_MODES, RolloutEngine  # noqa: E402
from modules.janus_ops import RowNoise  # noqa: E402


def device_events(prof, device: torch.device) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of every kernel (GPU) or every aten operator's self time (CPU) in a profile."""
    if device.type == "cuda":
        return [(e.name, e.device_time) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [(e.name, e.self_cpu_time_total) for e in prof.events() if e.name.startswith("aten::")]


def summary(events: list[tuple[str, float]], steps: int, wall_s: float, top: int) -> dict:
    per_name = defaultdict(lambda: [0, 0.0])
    for name, us in events:
        per_name[name][0] += 1
        per_name[name][1] += us
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(
        kernels_per_step=round(len(events) / steps, 1),
        busy_ms_per_step=round(sum(us for _, us in events) / 1e3 / steps, 4),
        wall_ms_per_step=round(1e3 * wall_s / steps, 4),
        top=[dict(name=name[:90], per_step=round(n / steps, 2), us_per_step=round(us / steps, 2))
             for name, (n, us) in ranked],
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["toy", "1b", "7b"], default="toy")
    parser.add_argument("--prompts", type=int, default=None, help="default: 16 on GPU, 4 on CPU (rows double with CFG)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--image-tokens", type=int, default=None, help="default: the model's (64 toy, 576)")
    parser.add_argument("--compile", default="off", help=f"comma-separated, of {', '.join(COMPILE_MODES)}")
    parser.add_argument("--no-capture", action="store_true", help="run fused steps uncaptured (their kernels, no graph)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per mode")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on GPU, else fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for mode in args.compile.split(","):
        if mode not in COMPILE_MODES:
            parser.error(f"--compile: unknown mode {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    gpu = torch.cuda.is_available()
    if args.shape != "toy" and not gpu:
        parser.error(f"--shape {args.shape} needs a CUDA device")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.prompts = args.prompts or (16 if gpu else 4)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = janus_at_shape(args.shape, device, getattr(torch, args.dtype))
    n_tokens = args.image_tokens or model.config.vision_config.num_image_tokens
    ids, mask, uncond = contexts(model, args.prompts, args.prompt_tokens, args.seed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for mode in args.compile.split(","):
        engine = RolloutEngine(compile=mode)
        if args.no_capture:
            engine.graphs.available = lambda device: False  # fused: the compiled parts, uncaptured

        def call(engine=engine):
            noise = RowNoise(torch.Generator(device=device).manual_seed(args.seed))
            out = engine.sample_image_tokens(model, ids, mask, n_tokens, uncond, 5.0, noise=noise)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        call()  # compiles and captures every window
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            call()
            wall = time.perf_counter() - start
        print(json.dumps(dict(
            measure="profile", mode=engine.mode(device), captured=engine.captures(device), shape=args.shape,
            dtype=args.dtype, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            rows=2 * args.prompts, image_tokens=n_tokens,
            **summary(device_events(prof, device), n_tokens, wall, args.top),
        )), flush=True)


if __name__ == "__main__":
    main()
