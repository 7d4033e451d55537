"""Where a decode step's time goes, and what could take it lower: the step's matmuls and its attention over the
KV cache, each in several implementations, timed over all decoder layers at the real shapes.

The static engine's `fused` step takes 2.85 ms at the Janus-Pro-1B shape on an H200 (32 rows), 40% of the
copy-bandwidth limit; issue 9 aims under 2 ms. At this batch a step is bound by memory traffic: the decoder's
weights (2.5 GB at 1B) and, about as much at the image stage's average window, the KV cache. This script
measures each of the two on its own, as the fraction of the bandwidth limit each implementation reaches:

    python benchmarks/decode_kernels.py --shape 1b                       # GPU: bf16, 32 rows, windows 128,384,640
    python benchmarks/decode_kernels.py --shape 7b --autotune            # + inductor max-autotune matmuls
    nice python benchmarks/decode_kernels.py --shape toy --reps 5        # CPU smoke test (figures mean nothing)

Matmuls (``part: "linear"``), one new token per row through every layer's projections:
- ``separate``: q, k, v, o, gate, up, down as seven ``F.linear`` calls (cuBLAS), as the engine does now;
- ``packed``: q/k/v in one ``[3H, H]`` weight and gate/up in one ``[2I, H]`` weight (``RolloutEngine(pack=True)``):
  three fewer launches, and wider matmuls that give the GPU more blocks to spread the weight reads over;
- ``triton_lin_n<N>_k<K>_s<S>_w<W>_p<P>``: the packed weights through ``modules.decode_linear``'s Triton kernel
  (``N`` output columns and ``K`` inner elements per block, ``S`` splits of the inner dimension, 0 for enough
  programs for every SM, ``W`` warps, ``P`` stages), with the residual adds and the MLP's activation inside the
  kernels (four kernels per layer, and a summing kernel per projection whose inner dimension is split, where
  cuBLAS runs four matmuls, a split-K sum, two copies and an activation). The default
  configuration, the same with 64-row programs (``_m64``: wgmma on sm_90), and with ``--linear-sweep`` 17 more
  (columns 32/64/128, inner blocks 64/128/256, 3 or 4 stages; ``--linear-launches`` names others), each also
  with ``_l`` at the end (``last``: the last program of each output tile adds the splits up, no summing kernel):
  38 in all. Needs the triton package and a CUDA device (or the interpreter);
- ``triton_lin_fp8``: the default configuration on the packed weights quantized to float8 with a scale per row
  (``engine_weights: fp8``; compute capability 8.9 or later): half the bytes, its ``bandwidth_fraction`` against
  those, its ``max_diff`` the quantization's; the weights widened to bf16 by their bits. ``triton_lin_fp8_c``: the
  same with Triton's own e4m3 conversion (``cast``), the way before; ``triton_lin_fp8_m64`` with 64-row programs
  (``block_m``: on sm_90 Triton's warpgroup wgmma, 32 rows filling half of each tile). Not launches: never the
  sweep's best;
- with ``--autotune``, both again under ``torch.compile(mode="max-autotune-no-cudagraphs")`` (Triton
  templates benchmarked against cuBLAS for each shape; minutes of compiling).

Attention (``part: "attention"``), one query per row and head over a window of the cache, with the engine's
additive bias (left padding masked), through the engine's own functions (``modules.decode_step.ATTENTION``, chosen
with ``RolloutEngine(attention=...)``):
- ``matmul``: the default (``q @ K^T``, float32 softmax, ``@ V``), plain calls;
- ``matmul_compiled``: the same under ``torch.compile``, as ``fused`` runs it (matmuls stay cuBLAS calls,
  the softmax is fused);
- ``sdpa``: ``F.scaled_dot_product_attention`` with the bias as its mask;
- ``reduce_compiled``: ``attention="reduce"`` under ``torch.compile``: scores and output as multiply-and-sum
  reductions, so inductor emits reduction kernels that stream the cache instead of batched one-row matmuls.
- ``triton_s<S>_b<B>_w<W>_p<P>`` and ``triton_n<N>_b<B>_w<W>_p<P>``: ``attention="triton"``
  (``modules.decode_attention``): split-K Triton kernels that read each row's filled slots only (here the window
  less the row's left padding: the new token sits in the window's last slot). In a rollout it also reads no slot
  past the last token, where the others read up to a ``chunk`` of them. One candidate per launch configuration:
  splits of ``S`` cache slots (``--triton-splits``) or each row's filled slots in ``N`` parts
  (``--triton-parts``), ``B`` keys and values per loop iteration (``--triton-blocks``), ``W`` warps
  (``--triton-warps``) and ``P`` blocks in flight (``--triton-stages``; > 1 pipelines the loop). A name ending
  in ``_m`` is the loop that merges each block into one running softmax across warps (``Launch.lanes=False``,
  the kernel before the default loop, which keeps one per position of the block): at each size it runs at the
  engine's block, warps and stages, right after the engine's own loop, so the same process measures the change;
  so does a name ending in ``_l`` (``Launch.last``: the last program of each row and head merges the splits, no
  ``_combine`` kernel), right after.
  The engine's own launch runs first (``modules.decode_attention.Launch()``, ``triton_a128_b32_w4_p2``: one
  program per row and head where the rows fill the GPU, else splits of 128 slots; block 32, 4 warps, 2 stages).
  By default only the splits vary and the rest is the engine's. With ``--triton-sweep`` all vary (splits of 64,
  128 or 256 slots or 1, 2, 4 or 8 parts, blocks of 32 or 64, 2, 4 or 8 warps, 1 to 3 stages: 126
  configurations, 7 ``_m`` and 7 ``_l`` ones; a block larger than its split is skipped; the engine's own and the
  21 at its block, warps and stages first), each
  candidate runs at every window before the next (a run cut short ranks what it measured), a
  ``triton_best`` line per window names the fastest against the engine's configuration and
  ``matmul_compiled``, and ``triton_best_overall`` the one of least time summed over the windows:

      python benchmarks/decode_kernels.py --shape 1b --triton-sweep --windows 384,640

  A candidate's name is also an engine option: ``python benchmarks/rollout.py --shape 1b --compile
  fused+pack+triton_s64_b64_w8_p2`` times the whole rollout at that configuration, and
  ``RolloutEngine(attention="triton", triton_launch="triton_s64_b64_w8_p2")`` uses it.

  Needs the triton package and a CUDA device (or ``TRITON_INTERPRET=1`` on CPU, for the tests).

On CUDA each implementation's pass over all layers is captured as one CUDA graph and replayed, so launch
overhead is out of the figure, as in the engine. Every layer has its own weights and cache, so nothing is
read from L2 twice in a pass. Each line gives ``us_per_step``, the bytes read, ``bandwidth_fraction`` (bytes
over the measured copy bandwidth, divided by the time) and ``max_diff`` against the first implementation of
its part. Random weights; one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import LM_SHAPES, copy_bandwidth, device_name  # noqa: E402

from modules import decode_attention, decode_linear, fp8  # noqa: E402
from modules.decode_step import ATTENTION, attention_bias  # noqa: E402
from modules.engine_capture import CudaGraphs  # noqa: E402

SHAPES = {**LM_SHAPES, "toy": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=344)}


# --triton-sweep: the launch configurations of the triton attention timed against each other
SWEEP = dict(splits=(64, 128, 256), parts=(1, 2, 4, 8), blocks=(32, 64), warps=(2, 4, 8), stages=(1, 2, 3))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--rows", type=int, default=32, help="batch rows (16 prompts with CFG: 32)")
    parser.add_argument("--windows", default="128,384,640", help="attention windows (cache slots read)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--reps", type=int, default=50, help="timed passes per implementation (the median counts)")
    parser.add_argument("--autotune", action="store_true", help="also the matmuls under inductor max-autotune")
    parser.add_argument("--linear-sweep", action="store_true",
                        help="the Triton projections at 38 launch configurations (default: decode_linear's own)")
    parser.add_argument("--linear-launches", default=None,
                        help="the Triton projections at these launch configurations, comma-separated names "
                             "triton_lin_n<N>_k<K>_s<S>_w<W>_p<P>")
    parser.add_argument("--triton-splits", default=None,
                        help="cache slots per program of the triton attention, comma-separated (default 64,128,256,1024; "
                             "one that covers the window runs one kernel, not two)")
    parser.add_argument("--triton-parts", default=None,
                        help="also each row's filled slots in this many splits, comma-separated (default: none)")
    parser.add_argument("--triton-blocks", default=None, help="keys per loop iteration, powers of 2 (default: the engine's)")
    parser.add_argument("--triton-warps", default=None, help="warps per program, powers of 2 (default: the engine's)")
    parser.add_argument("--triton-stages", default=None, help="pipeline stages of the loop (default: the engine's)")
    parser.add_argument("--triton-sweep", action="store_true",
                        help=f"every combination of splits {SWEEP['splits']} or parts {SWEEP['parts']}, blocks "
                             f"{SWEEP['blocks']}, warps {SWEEP['warps']} and stages {SWEEP['stages']} (those not "
                             "given), and the best per window and over them")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    args = parser.parse_args()
    try:
        args.windows = [int(w) for w in args.windows.split(",")]
        da = decode_attention
        engine = dict(splits=(64, 128, 256, 1024), parts=(), blocks=(da.BLOCK,), warps=(da.WARPS,),
                      stages=(da.STAGES,))
        for name in ("splits", "parts", "blocks", "warps", "stages"):
            given = getattr(args, f"triton_{name}")
            default = SWEEP[name] if args.triton_sweep else engine[name]
            setattr(args, f"triton_{name}", [int(n) for n in given.split(",") if n] if given else list(default))
    except ValueError as error:
        parser.error(f"a comma-separated list of integers was expected: {error}")
    lists = args.windows + args.triton_splits + args.triton_parts + args.triton_stages
    if args.rows < 1 or args.reps < 1 or any(n < 1 for n in lists):
        parser.error("--rows, --reps, every window, triton split, part and stage count must be >= 1")
    if any(n < 1 or n & (n - 1) for n in args.triton_blocks + args.triton_warps):
        parser.error("every triton block and warp count must be a power of 2")
    try:
        linear_launches(args)
    except ValueError as error:
        parser.error(f"--linear-launches: {error}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    return args


class Layers:
    """Random weights of every decoder layer, separate and packed, and a KV cache per layer."""

    def __init__(self, shape: dict, rows: int, capacity: int, device, dtype) -> None:
        hidden, inter = shape["hidden_size"], shape["intermediate_size"]
        self.heads, self.kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        self.dim = 128 if hidden >= 2048 else hidden // self.heads
        self.layers = shape["num_hidden_layers"]

        def weight(out: int, inp: int) -> torch.Tensor:
            return torch.randn(out, inp, device=device, dtype=dtype) * inp**-0.5

        q, kv = self.heads * self.dim, self.kv_heads * self.dim
        self.separate = [
            dict(q=weight(q, hidden), k=weight(kv, hidden), v=weight(kv, hidden), o=weight(hidden, q),
                 gate=weight(inter, hidden), up=weight(inter, hidden), down=weight(hidden, inter))
            for _ in range(self.layers)
        ]
        self.packed = [
            dict(qkv=torch.cat([w["q"], w["k"], w["v"]]), o=w["o"], gate_up=torch.cat([w["gate"], w["up"]]),
                 down=w["down"])
            for w in self.separate
        ]
        self.split = (q, kv, kv, inter)
        cache = (rows, self.kv_heads, capacity, self.dim)
        self.keys = [torch.randn(cache, device=device, dtype=dtype) for _ in range(self.layers)]
        self.values = [torch.randn(cache, device=device, dtype=dtype) for _ in range(self.layers)]
        self.x = torch.randn(rows, hidden, device=device, dtype=dtype)
        self.query = torch.randn(rows, self.kv_heads, self.heads // self.kv_heads, self.dim, device=device,
                                 dtype=dtype)
        generator = torch.Generator().manual_seed(0)
        self.pad = torch.randint(0, 16, (rows,), generator=generator).to(device)  # left padding per row

    def linear_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for layer in self.separate for w in layer.values())

    def attention_bytes(self, window: int) -> int:
        one = self.keys[0][:, :, :window]
        return 2 * self.layers * one.numel() * one.element_size()

    def slot(self, window: int) -> torch.Tensor:
        """The cache slot of a new token in the window's last slot."""
        return torch.tensor([window - 1], device=self.pad.device)

    def bias(self, window: int) -> torch.Tensor:
        """The engine's bias for a new token in the window's last slot: each row's left padding masked."""
        return attention_bias(self.pad, self.slot(window), window)


# ---- the implementations -----------------------------------------------------------------------------


def linear_separate(x: torch.Tensor, w: dict) -> torch.Tensor:
    q, k, v = F.linear(x, w["q"]), F.linear(x, w["k"]), F.linear(x, w["v"])
    h = x + F.linear(q + k + v, w["o"])  # uses q, k and v at the cost of two adds (heads == KV heads here)
    return h + F.linear(F.silu(F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])


def linear_triton(x: torch.Tensor, w: dict, split: tuple, launch: tuple = ()) -> torch.Tensor:
    """:func:`linear_packed` through ``modules.decode_linear`` (``launch``: a ``LinearLaunch``), the adds and the
    activation inside the kernels. A weight may be a pair ``(float8 weight, float32 scale per row)``
    (:func:`quantized`)."""

    def project(x, weight, residual=None, gated=False):
        if isinstance(weight, tuple):
            return decode_linear.decode_linear(x, weight[0], residual, gated, *launch, scale=weight[1])
        return decode_linear.decode_linear(x, weight, residual, gated, *launch)

    q, k, v = project(x, w["qkv"]).split(split[:3], -1)
    h = project(q + k + v, w["o"], x)
    gated = project(h, w["gate_up"], None, True)
    return project(gated, w["down"], h)


FP8_CANDIDATE = "triton_lin_fp8"
FP8_CANDIDATES = {  # name: launch
    FP8_CANDIDATE: decode_linear.LinearLaunch(),
    FP8_CANDIDATE + "_c": decode_linear.LinearLaunch(cast=True),
    FP8_CANDIDATE + "_m64": decode_linear.LinearLaunch(block_m=64),
}


def quantized(packed: list[dict]) -> list[dict]:
    """Each layer's packed weights as ``(float8 weight, float32 scale per row)`` pairs (``engine_weights: fp8``)."""
    return [{name: fp8.quantize(w) for name, w in layer.items()} for layer in packed]


def linear_launches(args) -> list:
    """The ``LinearLaunch`` configurations to time: ``--linear-launches``, or with ``--linear-sweep`` the default
    and a grid around it, or the default alone."""
    Launch = decode_linear.LinearLaunch
    if args.linear_launches:
        return [Launch.parse(name) for name in args.linear_launches.split(",") if name]
    if not args.linear_sweep:
        return [Launch()]
    grid = [Launch(block_n=n, block_k=k, stages=p) for n in (32, 64, 128) for k in (64, 128, 256) for p in (3, 4)]
    # each right before its `_l` twin (the tile's last program sums the splits): a cut-short run has both; the
    # default with 64-row programs (wgmma on sm_90) second
    first = [Launch(), Launch(block_m=64)]
    return list(dict.fromkeys(pair for launch in [*first, *grid] for pair in (launch, launch._replace(last=True))))


def linear_packed(x: torch.Tensor, w: dict, split: tuple) -> torch.Tensor:
    q, k, v = F.linear(x, w["qkv"]).split(split[:3], -1)
    h = x + F.linear(q + k + v, w["o"])
    gate, up = F.linear(h, w["gate_up"]).split([split[3], split[3]], -1)
    return h + F.linear(F.silu(gate) * up, w["down"])


# ---- timing -----------------------------------------------------------------------------------------


def every_layer(layers: Layers, fn):
    """One pass: ``fn(x, layer index)`` for every layer, outputs stacked (what the timing compares)."""

    def run() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([fn(layers.x, i) for i in range(layers.layers)])

    return run


def measure(run, device: torch.device, reps: int) -> tuple[float, torch.Tensor, float]:
    """``(median seconds per pass, the pass's output, seconds of the first call)``; CUDA: replays of a graph."""
    start = time.perf_counter()
    out = run()  # compiles, if any
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out, first
    graphs, outs = CudaGraphs(), []  # the engine's own warm-up and capture
    graphs.warmup(run, device)
    replay = graphs.capture(lambda: outs.append(run()), device)
    replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times), outs[0].clone(), first


def report(args, part: str, name: str, seconds: float, nbytes: int, bandwidth, out, reference, first: float,
           **extra) -> None:
    diff = None if reference is None else float((out.float() - reference.float()).abs().max())
    line = dict(measure="decode_kernels", part=part, impl=name, shape=args.shape, rows=args.rows,
                dtype=str(args.dtype).removeprefix("torch."), device=device_name(args.device), **extra,
                us_per_step=round(seconds * 1e6, 1), mb_per_step=round(nbytes / 1e6, 1),
                bandwidth_fraction=None if bandwidth is None else round(nbytes / bandwidth / seconds, 4),
                first_call_s=round(first, 2), max_diff=diff)
    print(json.dumps(line), flush=True)


def triton_candidates(args) -> dict:
    """``{name: attend}``: ``attention="triton"`` (same arguments as :data:`modules.decode_step.ATTENTION`'s) at each
    launch configuration of ``args.triton_*``: splits of ``--triton-splits`` slots (a block larger than its split
    is skipped), then each row in ``--triton-parts`` parts. First the engine's own (``Launch()``: with
    ``parts=AUTO``, what its rule picks at these rows on this GPU), then at each size and the engine's block, warps
    and stages, the default loop, the one that merges each block into one running softmax (``_m``, the kernel
    before: the same process says what the change is worth) and the splits merged by each (row, head)'s last
    program (``_l``); then the rest."""
    sizes = [dict(split=split, parts=0) for split in args.triton_splits] + [dict(parts=parts) for parts in args.triton_parts]
    engine = decode_attention.Launch()
    # the engine's own (parts=AUTO: its rule's answer at these rows), then at each size its loop, _m and _l
    first = [engine] + [engine._replace(lanes=lanes, last=last, **size) for size in sizes
                        for lanes, last in ((True, False), (False, False), (True, True))]
    grid = [
        decode_attention.Launch(block=block, warps=warps, stages=stages, **size)
        for size in sizes
        for block in args.triton_blocks
        # a block larger than the split reads past it, masked: never faster than a smaller one
        if not (block > size.get("split", block) and len(args.triton_blocks) > 1)
        for warps in args.triton_warps
        for stages in args.triton_stages
    ]
    return {launch.name: functools.partial(ATTENTION["triton"], launch=launch) for launch in first + grid}


def engine_triton() -> str:
    """The candidate name of the engine's own launch configuration."""
    return decode_attention.Launch().name


def best_triton(timings: dict) -> tuple[str | None, dict]:
    """The triton configuration with the least time summed over the windows (``{window: {impl: us}}``; only
    configurations measured at every window count), and every such configuration's sum."""
    names = [set(t) for t in timings.values()]
    common = [n for n in set.intersection(*names) if n.startswith("triton_")] if names else []
    total = {n: round(sum(t[n] for t in timings.values()), 1) for n in common}
    return (min(total, key=total.get) if total else None), total


def tuned_attention(timings: dict) -> str | None:
    """:func:`best_triton`'s configuration for a rollout, with ``_l`` added where the sweep says it pays: the best
    lacks it, and at the best's size (splits or parts) and the engine's block, warps and stages the ``_l`` merge
    took less time summed over the windows than ``_combine`` (the sweep times ``_l`` only there)."""
    best, total = best_triton(timings)
    if best is None:
        return None
    launch = decode_attention.Launch.parse(best)
    if launch.last:
        return best
    plain = decode_attention.Launch()._replace(split=launch.split, parts=launch.parts)  # the engine's, at its size
    merged, last = total.get(plain.name), total.get(plain._replace(last=True).name)
    return launch._replace(last=True).name if None not in (merged, last) and last < merged else best


def timings_from_log(path, part: str = "attention") -> dict:
    """``{window: {impl: us}}`` from this script's output (a run cut short counts what it printed); for the
    ``linear`` part, ``{impl: us}``."""
    timings = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("part") != part or "us_per_step" not in entry:
                continue
            if part == "linear":
                timings[entry["impl"]] = entry["us_per_step"]
            else:
                timings.setdefault(entry["window"], {})[entry["impl"]] = entry["us_per_step"]
    return timings


def best_linear(timings: dict) -> str | None:
    """The fastest Triton projections (``triton_lin_...``) of ``{impl: us}``, where they beat every other
    implementation (cuBLAS's); else ``None``. :data:`FP8_CANDIDATES` read other weights (not launches): left out."""
    timings = {name: us for name, us in timings.items() if name not in FP8_CANDIDATES}
    ours = {name: us for name, us in timings.items() if name.startswith("triton_lin_")}
    if not ours:
        return None
    best = min(ours, key=ours.get)
    others = [us for name, us in timings.items() if name not in ours]
    return best if all(ours[best] < us for us in others) else None


def report_best(timings: dict, measure: str = "triton_best_overall", **label) -> str | None:
    """One ``measure`` line for :func:`best_triton` over ``timings`` (``{window: {impl: us}}``): the fastest triton
    configuration, against the engine's and ``matmul_compiled`` (``None`` where not measured at every window);
    returns its name."""
    best, total = best_triton(timings)
    if best is None:
        return None
    engine = total.get(engine_triton())
    others = [t.get("matmul_compiled") for t in timings.values()]
    other = None if None in others else round(sum(others), 1)
    print(json.dumps(dict(
        measure=measure, **label, impl=best, windows=sorted(timings), us=total[best], configurations=len(total),
        engine_impl=engine_triton(), engine_us=engine,
        speedup_vs_engine=None if engine is None else round(engine / total[best], 3),
        matmul_compiled_us=other, speedup_vs_matmul_compiled=None if other is None else round(other / total[best], 3),
    )), flush=True)
    return best


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    layers = Layers(shape, args.rows, max(args.windows), args.device, args.dtype)
    bandwidth = copy_bandwidth(args.device)
    print(json.dumps(dict(measure="setup", shape=args.shape, rows=args.rows, layers=layers.layers,
                          copy_bandwidth_tb_s=None if bandwidth is None else round(bandwidth / 1e12, 3))), flush=True)

    linears = {
        "separate": lambda x, i: linear_separate(x, layers.separate[i]),
        "packed": lambda x, i: linear_packed(x, layers.packed[i], layers.split),
    }
    if args.autotune:
        tuned = dict(mode="max-autotune-no-cudagraphs", dynamic=False, fullgraph=True)
        separate, packed = torch.compile(linear_separate, **tuned), torch.compile(linear_packed, **tuned)
        linears["separate_autotune"] = lambda x, i: separate(x, layers.separate[i])
        linears["packed_autotune"] = lambda x, i: packed(x, layers.packed[i], layers.split)
    if decode_attention.available() and (args.device.type == "cuda" or decode_attention.interpreted()):
        for launch in linear_launches(args):
            linears[launch.name] = lambda x, i, launch=launch: linear_triton(x, layers.packed[i], layers.split, launch)
        if args.device.type != "cuda" or torch.cuda.get_device_capability(args.device) >= (8, 9):
            fp8_layers = quantized(layers.packed)  # the default launch on float8 weights: half the bytes to read
            for name, launch in FP8_CANDIDATES.items():  # by their bits, in 64-row programs, by Triton's conversion
                linears[name] = lambda x, i, launch=launch: linear_triton(x, fp8_layers[i], layers.split, launch)
    fp8_bytes = sum(q.numel() + s.numel() * s.element_size() for layer in quantized(layers.packed[:1])
                    for q, s in layer.values()) * layers.layers if FP8_CANDIDATE in linears else 0
    reference = None
    for name, fn in linears.items():
        try:
            seconds, out, first = measure(every_layer(layers, fn), args.device, args.reps)
        except Exception as error:  # a configuration that cannot run here is reported, not fatal
            print(json.dumps(dict(measure="decode_kernels", part="linear", impl=name,
                                  error=f"{type(error).__name__}: {str(error).splitlines()[0]}")), flush=True)
            continue
        # triton_lin_fp8: the fraction of its own bytes; its max_diff is the quantization's, not a wrong result
        report(args, "linear", name, seconds, fp8_bytes if name in FP8_CANDIDATES else layers.linear_bytes(),
               bandwidth, out, reference, first)
        reference = out if reference is None else reference

    compiled = dict(dynamic=False, fullgraph=True)
    attentions = {
        "matmul": ATTENTION["matmul"],
        "matmul_compiled": torch.compile(ATTENTION["matmul"], **compiled),
        "sdpa": ATTENTION["sdpa"],
        "reduce_compiled": torch.compile(ATTENTION["reduce"], **compiled),
    }
    if decode_attention.available() and (args.device.type == "cuda" or decode_attention.interpreted()):
        attentions.update(triton_candidates(args))
    scale = layers.dim**-0.5
    every_window = {window: {} for window in args.windows}  # {window: {impl: us}}
    reference = {}  # {window: the first implementation's output}
    inputs = {window: (layers.bias(window), layers.slot(window)) for window in args.windows}
    # each implementation at every window before the next: a run cut short still ranks what it measured
    for name, fn in attentions.items():
        for window in args.windows:
            bias, slot = inputs[window]
            run = every_layer(layers, lambda x, i, fn=fn, window=window, bias=bias, slot=slot: fn(
                layers.query, layers.keys[i][:, :, :window], layers.values[i][:, :, :window], bias, scale,
                layers.pad, slot))
            try:
                seconds, out, first = measure(run, args.device, args.reps)
            except Exception as error:  # an implementation that cannot run here is reported, not fatal
                print(json.dumps(dict(measure="decode_kernels", part="attention", impl=name, window=window,
                                      error=f"{type(error).__name__}: {str(error).splitlines()[0]}")), flush=True)
                continue
            report(args, "attention", name, seconds, layers.attention_bytes(window), bandwidth, out,
                   reference.get(window), first, window=window)
            reference.setdefault(window, out)
            every_window[window][name] = round(seconds * 1e6, 1)
    for window, timings in every_window.items():
        report_best({window: timings}, "triton_best", window=window)
    report_best(every_window)


if __name__ == "__main__":
    main()
