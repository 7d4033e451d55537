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

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import Bench, checked_args, device_name, shape_arguments, timed  # noqa: E402


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


def main() -> None:
    parser = shape_arguments(__doc__, compile_default="off")
    parser.add_argument("--no-capture", action="store_true", help="run fused steps uncaptured (their kernels, no graph)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per mode")
    b = Bench.build(checked_args(parser, prompts=(16, 4)))
    args, device, n_tokens = b.args, b.device, b.n_tokens
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for engine in b.engines().values():
        if args.no_capture:
            engine.graphs.available = lambda device: False  # fused: the compiled parts, uncaptured

        call = b.sampler(engine.sample_image_tokens)
        timed(call, device)  # compiles and captures every window
        with profile(activities=activities) as prof:
            wall = timed(call, device)[0]
        print(json.dumps(dict(
            measure="profile", mode=engine.mode(device), attention=engine.attention, captured=engine.captures(device),
            shape=args.shape,
            dtype=args.dtype, device=device_name(device),
            rows=2 * args.prompts, image_tokens=n_tokens,
            **summary(device_events(prof, device), n_tokens, wall, args.top),
        )), flush=True)


if __name__ == "__main__":
    main()
