"""Decode attention that reads only the filled part of the KV cache: ``RolloutEngine(attention="triton")``.

One query per row and head attends over slots ``pad[r] .. slot`` of its row (its real context and the tokens
sampled so far), in one or two Triton kernels ("split-K" or flash-decoding):

1. ``_partial``: one program per (row, head, split of the cache). It streams its split's part of the filled
   slots in blocks of ``BLOCK`` keys and values, in float32, with a running maximum (online softmax), and writes
   the split's maximum, normaliser and weighted sum of values. A split that holds no filled slot reads nothing.
   Splits are ``SPLIT`` cache slots each, or (``Launch.parts``) each row's filled slots in equal parts. By
   default (``parts=AUTO``) a call with enough rows to fill the GPU runs one program per (row, head) over all its
   filled slots, and only smaller ones split the cache (see :func:`resolve_parts`).
   Each of a block's ``BLOCK`` positions keeps its own running maximum, normaliser and sum of values
   (``Launch.lanes``, the default): a block's scores are reduced over the head dimension only, inside each warp,
   and the positions are merged once, after the loop. So the loop has no barrier and no shared memory (with one
   stage; the pipelined loop synchronises its copies). Merging the block into one running softmax at every
   iteration instead (``lanes=False``, the kernel before) reduces across warps three times per block: 9
   barriers and 32 shared-memory accesses per iteration in its Hopper PTX, against none.
2. ``_combine``: one program per (row, head) rescales the splits to one maximum and writes the output.
   Where there is one split, the first kernel writes the output itself and this one does not run. With
   ``Launch.last`` (names ending ``_l``) it never runs: each program of the first kernel counts its arrival on an
   int32 counter of its (row, head) (an atomic add with acquire-release order, after a barrier that puts the
   program's stores before it), and the last to arrive does the same merge, in the same order, and sets the
   counter back to 0. The counters are one buffer per device (:func:`counters`), shared with
   ``modules.decode_linear``'s kernels: zero between calls, so calls on one stream never disturb each other.

The slots read are the row's filled ones, not a window that covers them: where the other attention choices
read a bucket of ``chunk`` slots past the last token (and every left-padding slot), this reads exactly the
filled slots. ``pad`` and ``slot`` are read from device memory, so one captured CUDA graph serves every step of
a rollout: the engine uses a single attention window (the whole cache) with this choice.

It is registered as the custom op ``bicot::decode_attention`` so that ``torch.compile`` (``compile="fused"``)
keeps it whole inside a compiled decoder layer instead of breaking the graph.

On CPU, Triton runs only in its interpreter (``TRITON_INTERPRET=1`` set before Triton is imported): that is
how the tests check the kernels on machines without a GPU; it is far too slow for anything else.
"""

from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple

import torch

from modules.fp8 import FP8

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine's other attention choices need no Triton
    triton = None

# The launch configuration the engine uses. benchmarks/decode_kernels.py --triton-sweep times others. On an H200 at
# the 1B shape (32 rows, 16 heads, windows of 384 and 640 slots; benchmarks/results/h200_2026-11-28/sweep.log) the
# fastest of 123 was one program per (row, head) (parts 1), block 32, 4 warps, 2 stages: 1.7x the split-128,
# 1-stage launch that was the default before, and 2 stages beat 1 at every size with 4 warps.
BLOCK = 32  # keys and values per iteration of a program
SPLIT = 128  # the engine's cache slots per program where it splits (a multiple of BLOCK leaves no block part-empty)
WARPS = 4  # warps per program of the first kernel (Triton's default)
STAGES = 2  # blocks of keys and values in flight per program: > 1 pipelines its loop through shared memory
AUTO = -1  # Launch.parts: 1 where rows x heads programs fill the GPU's processors, else splits of SPLIT slots


class Launch(NamedTuple):
    """A launch configuration of the first kernel (the candidate names of ``benchmarks/decode_kernels.py``, and what
    ``RolloutEngine(triton_launch=...)`` takes):

    - ``triton_s<split>_b<block>_w<warps>_p<stages>``: the cache cut into splits of ``split`` slots, one program
      each (a split past the last token, or before a row's first, reads nothing);
    - ``triton_n<parts>_b<block>_w<warps>_p<stages>``: each row's filled slots cut into ``parts`` equal splits
      (rounded up to whole blocks), one program each, however long the row is: no program without work,
      the same number of programs at every step;
    - ``triton_a<split>_b<block>_w<warps>_p<stages>`` (``parts=AUTO``, the default): ``n1`` where a call's rows x
      heads programs fill the GPU's processors at least once, else ``s<split>`` (:func:`resolve_parts`);
    - ``_m`` at the end: ``lanes=False``, the loop that merges each block into one running softmax (see the module);
    - ``_l`` at the very end: ``last=True``, the splits merged by the last program of each (row, head), no second
      kernel (see the module).
    """

    split: int = SPLIT
    block: int = BLOCK
    warps: int = WARPS
    stages: int = STAGES
    parts: int = AUTO  # > 0: the filled slots in this many splits (``split`` unused); 0: splits of ``split``
    lanes: bool = True  # False: each block merged into one running softmax per iteration (name suffix _m)
    last: bool = False  # the last program of each (row, head) merges the splits, no second kernel (suffix _l)

    @classmethod
    def parse(cls, name: str) -> Launch:
        match = re.fullmatch(r"triton_([sna])(\d+)_b(\d+)_w(\d+)_p(\d+)(_m)?(_l)?", name)
        if match is None:
            raise ValueError(
                "a triton launch is named triton_s<split>_b<block>_w<warps>_p<stages>, "
                "triton_n<parts>_b<block>_w<warps>_p<stages> or triton_a<split>_b<block>_w<warps>_p<stages> (one "
                f"split per row where the rows fill the GPU), with _m at the end for lanes=False and then _l for "
                f"last=True, got {name!r}"
            )
        kind, size, block, warps, stages, merged, last = match.groups()
        if kind == "n" and int(size) < 1:
            raise ValueError(f"decode_attention: parts must be >= 1, got {name!r}")
        size = dict(parts=int(size)) if kind == "n" else dict(split=int(size), parts=AUTO if kind == "a" else 0)
        return cls(block=int(block), warps=int(warps), stages=int(stages), lanes=merged is None, last=last is not None,
                   **size).checked()

    def checked(self) -> Launch:
        """Itself; raises a ``ValueError`` that names the value out of range."""
        if self.block < 1 or self.block & (self.block - 1) or self.warps < 1 or self.warps & (self.warps - 1):
            raise ValueError(
                f"decode_attention: block and warps must be powers of 2, got block={self.block}, warps={self.warps}"
            )
        if self.split < 1 or self.stages < 1 or self.parts < AUTO:
            raise ValueError(
                f"decode_attention: split and stages must be >= 1 and parts >= 1 (or 0: splits of split slots, or "
                f"{AUTO}: one split per row where the rows fill the GPU), got split={self.split}, "
                f"stages={self.stages}, parts={self.parts}"
            )
        return self

    @property
    def name(self) -> str:
        size = f"n{self.parts}" if self.parts > 0 else f"{'a' if self.parts == AUTO else 's'}{self.split}"
        return (f"triton_{size}_b{self.block}_w{self.warps}_p{self.stages}" + ("" if self.lanes else "_m")
                + ("_l" if self.last else ""))


_COUNTERS: dict[torch.device, torch.Tensor] = {}  # per device: arrival counters of the `last` launches, all zero


def counters(device: torch.device, needed: int) -> torch.Tensor:
    """At least ``needed`` int32 counters on ``device``, zero between kernel calls: the same buffer at every call
    (made before a CUDA graph captures a call: the engine warms every step up first). A kernel whose last
    program finds its count complete sets it back to 0, so one stream's calls can share it; two streams at once
    could not (the engine uses one)."""
    held = _COUNTERS.get(device)
    if held is None or held.numel() < needed:
        held = _COUNTERS[device] = torch.zeros(max(4096, needed), dtype=torch.int32, device=device)
    return held


@functools.cache
def processors(device: torch.device) -> int:
    """The streaming multiprocessors of CUDA ``device`` (0 elsewhere: Triton's interpreter on CPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def resolve_parts(parts: int, programs: int, device: torch.device) -> int:
    """``parts`` as the kernel runs it: ``AUTO`` is 1 (each (row, head) one program over all its filled slots, no
    second kernel) where ``programs`` (rows x heads) fill ``device``'s processors at least once, else 0 (splits of
    ``split`` slots: more programs for a small batch, at the cost of the merge). Others are returned as they are.

    On an H200 at the 1B shape (32 rows x 16 heads = 512 programs, 132 processors) one program per row and head
    took 1,740 us (24 layers at windows of 384 and 640 slots, summed) against 1,935 us for the fastest split
    launch; how small a batch is better split was not measured, so the rule splits only below one program per
    processor."""
    if parts != AUTO:
        return parts
    available = processors(device)
    return 1 if available and programs >= available else 0


def available() -> bool:
    """Whether Triton is importable here."""
    return triton is not None


def runs_on(device: torch.device) -> bool:
    """Whether the compiled kernels run on ``device``: a CUDA GPU of compute capability 8.0 or later (Ampere on;
    the pipelined loop's asynchronous copies need it) where Triton is importable."""
    return available() and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def interpreted() -> bool:
    """Whether Triton runs its interpreter (CPU tensors) instead of compiling GPU kernels."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the environment
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def require(what: str = "attention", others: str = "matmul, reduce, sdpa") -> None:
    """Raise a clear error where Triton is missing for the engine's ``what`` (``attention`` or ``linear``)."""
    if triton is None:
        raise RuntimeError(
            f"engine {what} 'triton' needs the triton package (pip install triton; CUDA builds of torch ship it). "
            f"Other choices: {others}."
        )


def check_device(device: torch.device, what: str = "attention", others: str = "matmul, reduce, sdpa") -> None:
    """Raise a clear error where ``attention="triton"`` (or the engine's ``what``) cannot run on ``device``."""
    require(what, others)
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"engine {what} 'triton' runs on CUDA devices, not {device.type} (on CPU only Triton's interpreter "
            f"runs it, with TRITON_INTERPRET=1, for tests). Other choices: {others}."
        )


if triton is not None:

    @triton.jit
    def _arrives_last(counter, programs):
        """``last`` launches: whether this program is the last of ``programs`` to count its arrival on ``counter``.
        The barrier puts every thread's stores before the count; the count (one thread, acquire-release at GPU
        scope) publishes them and, for the last, makes the others' visible; its result reaches every thread
        through shared memory and a barrier. The last one, having read what it needs, calls :func:`_rearm`."""
        tl.debug_barrier()
        return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == programs - 1

    @triton.jit
    def _rearm(counter):
        """Set ``counter`` back to 0 for the next call (every program of this one has counted already)."""
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _merge(part_max, part_sum, part_acc, out, row, head, splits, dim, stride_or, stride_ok, stride_og, groups,
               SPLITS: tl.constexpr, DIM: tl.constexpr):
        """The splits of (row, head) rescaled to one maximum and written out; the values summed one split after the
        other, in split order (unrolled rather than one ``[SPLITS, DIM]`` tile and a reduction across it: under
        ``LAST`` that tile cost the first kernel 16 more registers per thread). Read through L2 (``.cg``): other
        programs wrote them."""
        kv_head, group = head // groups, head % groups
        base = (row * tl.num_programs(1) + head) * splits
        s = tl.arange(0, SPLITS)
        used = s < splits
        best = tl.load(part_max + base + s, mask=used, other=float("-inf"), cache_modifier=".cg")  # [SPLITS]
        top = tl.max(best, 0)
        weight = tl.exp(best - top)  # 0 for a split without filled slots
        total = tl.sum(weight * tl.load(part_sum + base + s, mask=used, other=0.0, cache_modifier=".cg"), 0)
        d = tl.arange(0, DIM)
        acc = tl.zeros([DIM], tl.float32)
        for split in tl.static_range(SPLITS):  # unrolled: no load waits for another split's arithmetic
            at = base + tl.minimum(split, splits - 1)  # past the last split: the last one again, weighted 0
            share = tl.where(split < splits, tl.exp(tl.load(part_max + at, cache_modifier=".cg") - top), 0.0)
            acc += share * tl.load(part_acc + at * DIM + d, cache_modifier=".cg")
        result = acc / total
        target = out + row * stride_or + kv_head * stride_ok + group * stride_og + d
        tl.store(target, result.to(out.dtype.element_ty), mask=d < dim)

    @triton.jit
    def _partial(
        q, keys, values, pad, slot, part_max, part_sum, part_acc, out, count, k_scale, v_scale,
        stride_qr, stride_qk, stride_qg, stride_kr, stride_kh, stride_ks,
        stride_vr, stride_vh, stride_vs, stride_or, stride_ok, stride_og, stride_sr, stride_sh,
        groups, dim, split_len, scaling,
        BLOCK: tl.constexpr, DIM: tl.constexpr, DIRECT: tl.constexpr, STAGES: tl.constexpr, PARTS: tl.constexpr,
        LANES: tl.constexpr, LAST: tl.constexpr, SPLITS: tl.constexpr, SCALED: tl.constexpr,
    ):  # SCALED: float8 keys and values, each slot's vector with its float32 scale (k_scale/v_scale [R, kv_heads, S])
        row, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv_head, group = head // groups, head % groups
        first_filled = tl.load(pad + row).to(tl.int32)  # int32 loop bounds throughout
        last = tl.load(slot).to(tl.int32) + 1
        if PARTS > 0:  # the row's filled slots in PARTS splits of whole blocks
            length = tl.cdiv(tl.cdiv(last - first_filled, PARTS), BLOCK) * BLOCK
            start = first_filled + split * length
            end = tl.minimum(start + length, last)
        else:  # the cache in splits of split_len slots
            start = tl.maximum(first_filled, split * split_len)
            end = tl.minimum(last, (split + 1) * split_len)
        d = tl.arange(0, DIM)
        in_dim = d < dim
        query = tl.load(q + row * stride_qr + kv_head * stride_qk + group * stride_qg + d, mask=in_dim, other=0.0)
        query = query.to(tl.float32) * scaling
        k_row = keys + row * stride_kr + kv_head * stride_kh
        v_row = values + row * stride_vr + kv_head * stride_vh
        # LANES: a running maximum, normaliser and sum of values per position of the block, merged after the loop
        width: tl.constexpr = BLOCK if LANES else 1
        best = tl.full([width], float("-inf"), tl.float32)
        total = tl.zeros([width], tl.float32)
        acc = tl.zeros([width, DIM], tl.float32)
        # STAGES > 1: Triton pipelines the loop, copying the next blocks' keys and values into shared memory
        # (cp.async) while this one is reduced; 1 issues each block's loads when its turn comes
        for first in tl.range(start, end, BLOCK, num_stages=STAGES):
            n = first + tl.arange(0, BLOCK)
            filled = n < end
            both = filled[:, None] & in_dim[None, :]
            # both loads first: their round trips to memory overlap instead of following each other
            k = tl.load(k_row + n[:, None] * stride_ks + d[None, :], mask=both, other=0.0).to(tl.float32)
            v = tl.load(v_row + n[:, None] * stride_vs + d[None, :], mask=both, other=0.0).to(tl.float32)
            score = tl.sum(k * query[None, :], 1)  # [BLOCK], within each warp
            if SCALED:  # each key's and value's scale: on the score, and on the value's weight below
                at = row * stride_sr + kv_head * stride_sh + n
                score *= tl.load(k_scale + at, mask=filled, other=0.0)
                v_scales = tl.load(v_scale + at, mask=filled, other=0.0)
            score = tl.where(filled, score, float("-inf"))
            if LANES:  # elementwise over the block's positions: no reduction across warps
                new_best = tl.maximum(best, score)
                shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a position not yet filled: exp(-inf) = 0
                weight = tl.exp(score - shift)
                rescale = tl.exp(best - shift)
                v_weight = weight * v_scales if SCALED else weight
                acc = acc * rescale[:, None] + v_weight[:, None] * v
                total = total * rescale + weight
            else:  # the block's maximum, normaliser and values reduced across warps at every iteration
                new_best = tl.maximum(best, tl.max(score, 0))
                weight = tl.exp(score - new_best)
                rescale = tl.exp(best - new_best)
                v_weight = weight * v_scales if SCALED else weight
                acc = acc * rescale[:, None] + tl.sum(v_weight[:, None] * v, 0)[None, :]
                total = total * rescale + tl.sum(weight, 0)
            best = new_best
        # the positions merged (one already where not LANES); a split with no filled slot keeps -inf, 0 and 0
        top = tl.max(best, 0)
        share = tl.exp(best - tl.where(top == float("-inf"), 0.0, top))
        acc = tl.sum(acc * share[:, None], 0)
        total = tl.sum(total * share, 0)
        best = top
        if DIRECT:  # a single split: this program's result is the output, no second kernel
            target = out + row * stride_or + kv_head * stride_ok + group * stride_og + d
            tl.store(target, (acc / total).to(out.dtype.element_ty), mask=in_dim)
        else:
            at = (row * tl.num_programs(1) + head) * tl.num_programs(2) + split
            one = tl.arange(0, 1)
            tl.store(part_max + at + one, best)
            tl.store(part_sum + at + one, total)
            tl.store(part_acc + at * DIM + d, acc)
            if LAST:  # _combine's merge by the last of the (row, head)'s programs to get here
                counter = count + row * tl.num_programs(1) + head
                if _arrives_last(counter, tl.num_programs(2)):
                    _merge(part_max, part_sum, part_acc, out, row, head, tl.num_programs(2), dim, stride_or,
                           stride_ok, stride_og, groups, SPLITS, DIM)
                    _rearm(counter)

    @triton.jit
    def _combine(
        part_max, part_sum, part_acc, out, splits, dim, stride_or, stride_ok, stride_og, groups,
        SPLITS: tl.constexpr, DIM: tl.constexpr,
    ):
        _merge(part_max, part_sum, part_acc, out, tl.program_id(0), tl.program_id(1), splits, dim, stride_or,
               stride_ok, stride_og, groups, SPLITS, DIM)


@torch.library.custom_op("bicot::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pad: torch.Tensor,
    slot: torch.Tensor,
    scaling: float,
    split: int = SPLIT,
    block: int = BLOCK,
    warps: int = WARPS,
    stages: int = STAGES,
    parts: int = AUTO,
    lanes: bool = True,
    last: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q [R, kv_heads, groups, D]`` (one query per row and head) over the slots ``pad[r] .. slot``
    of ``keys``/``values`` ``[R, kv_heads, S, D]`` (any strides along the first three dims, the last contiguous);
    ``pad [R]`` and ``slot [1]`` long, on the device. Returns ``[R, kv_heads, groups, D]`` in ``q``'s dtype.
    Scores, softmax and the weighted sum are float32 throughout.

    The launch configuration of the first kernel (``benchmarks/decode_kernels.py --triton-sweep`` times others):
    ``split`` cache slots per program, ``block`` keys and values per iteration (a power of 2), ``warps`` per
    program (a power of 2) and ``stages``, the blocks in flight (> 1: the loop is software-pipelined through
    shared memory, ``stages * block * D`` keys and as many values per program); ``parts`` > 0 cuts each row's
    filled slots into that many splits instead, ``AUTO`` one where the rows fill the GPU (:func:`resolve_parts`);
    ``lanes``, how the loop accumulates, and
    ``last``, which kernel merges the splits (see the module). They change the speed, not the result.

    ``k_scale``/``v_scale`` ``[R, kv_heads, S]`` float32: ``keys``/``values`` are float8 (e4m3), each slot's
    vector times its scale (:func:`modules.fp8.quantize`; ``RolloutEngine(kv="fp8")``), half the bytes of bf16."""
    check_device(q.device)
    Launch(split, block, warps, stages, parts, lanes, last).checked()
    rows, kv_heads, groups, dim = q.shape
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention needs the last dimension of q, keys and values contiguous")
    scaled = k_scale is not None
    if (v_scale is not None) != scaled or (keys.dtype == FP8) != scaled or (values.dtype == FP8) != scaled:
        raise ValueError(f"decode_attention: float8_e4m3fn keys and values come with their float32 scales per slot "
                         f"(k_scale, v_scale) and only they do, got {keys.dtype} keys, {values.dtype} values and "
                         f"{'no ' if k_scale is None else ''}k_scale, {'no ' if v_scale is None else ''}v_scale")
    if scaled and not all(t.dtype == torch.float32 and t.shape == keys.shape[:3] and t.stride() == k_scale.stride()
                          and t.stride(-1) == 1 for t in (k_scale, v_scale)):
        raise ValueError(f"decode_attention: k_scale and v_scale must be float32 {list(keys.shape[:3])} with the same "
                         f"strides, the last contiguous; got {k_scale.dtype} {list(k_scale.shape)} and {v_scale.dtype} "
                         f"{list(v_scale.shape)}")
    heads = kv_heads * groups
    parts = resolve_parts(parts, rows * heads, q.device)
    splits = parts or triton.cdiv(keys.shape[2], split)
    padded = triton.next_power_of_2(dim)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if splits == 1:  # the first kernel writes the output: no partial results (it does not touch these pointers)
        part_max = part_sum = part_acc = out
    else:
        part_max = torch.empty(rows * heads * splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(rows * heads * splits * padded, dtype=torch.float32, device=q.device)
    last = last and splits > 1
    count = counters(q.device, rows * heads) if last else out  # not touched without LAST
    k_scale, v_scale = (k_scale, v_scale) if scaled else (out, out)  # not read without SCALED
    _partial[(rows, heads, splits)](
        q, keys, values, pad, slot, part_max, part_sum, part_acc, out, count, k_scale, v_scale,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1), out.stride(2),
        k_scale.stride(0) if scaled else 0, k_scale.stride(1) if scaled else 0,
        groups, dim, split, scaling,
        BLOCK=block, DIM=padded, DIRECT=splits == 1, STAGES=stages, PARTS=parts, LANES=lanes, LAST=last,
        SPLITS=triton.next_power_of_2(splits) if last else 1, SCALED=scaled, num_warps=warps,
    )
    if splits > 1 and not last:
        _combine[(rows, heads)](
            part_max, part_sum, part_acc, out, splits, dim, out.stride(0), out.stride(1), out.stride(2), groups,
            SPLITS=triton.next_power_of_2(splits), DIM=padded,
        )
    return out


@decode_attention.register_fake
def _(q, keys, values, pad, slot, scaling, split=SPLIT, block=BLOCK, warps=WARPS, stages=STAGES, parts=AUTO, lanes=True,
      last=False, k_scale=None, v_scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
