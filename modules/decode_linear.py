"""A decoder layer's projections for a few rows (a decode step's batch), in Triton: a candidate for the rollout's
projections, measured against cuBLAS with ``benchmarks/decode_kernels.py`` (``linear`` part, ``triton_lin_...``).

At a decode step the projections multiply a few rows (32 at 16 prompts with CFG) by each weight matrix: they are
bound by reading the weights. cuBLAS reached 33% (``o_proj``, 2048 x 2048) to 77% (``gate_up``) of the H200's copy
bandwidth inside the 1B step (the kernel profile in the README): for a narrow matrix its tiles give too few blocks
to keep every SM reading. This kernel cuts the output columns into blocks of ``block_n`` (and the inner
dimension into ``split_k`` parts where the columns alone give too few programs), streams each program's weight
rows in blocks of ``block_k`` through a ``stages``-deep pipeline, and multiplies with the tensor cores
(``tl.dot``, float32 accumulation). It also does the work around the matmul that otherwise costs a kernel each:

- ``residual``: ``residual + x @ W^T`` (the decoder layer's two residual adds; cuBLAS's ``addmm`` copies the
  residual into its output first, one more kernel);
- ``gated``: ``silu(x @ G^T) * (x @ U^T)`` from the packed ``[gate; up]`` matrix of ``RolloutEngine(pack=True)``
  (the MLP's activation, and half the output written).

Where the inner dimension is split, each program stores its float32 sums and a second kernel adds the splits up
in order and finishes. With ``last`` (launch names ending ``_l``) there is no second kernel: each program counts
its arrival on an int32 counter of its output tile (an atomic add with acquire-release order, after a barrier
that puts the program's stores before it) and the last of a tile's programs to arrive adds the splits up, in the
same order (the same result), finishes and sets the counter back to 0 for the next call. The counters are one
buffer per device, zero between calls, shared with the attention's (``modules.decode_attention.counters``).

The roundings follow the eager module calls: the matmul's result is rounded to the weight's dtype (as
``F.linear`` returns it), then the activation and the residual add are done in float32 and rounded like
PyTorch's own elementwise kernels. The input is cast to the weight's dtype first, as autocast does.

Float8 (e4m3) weights with a float32 scale per row (``RolloutEngine(weights="fp8")``) read half the bytes. The
kernel widens them to bf16 for the tensor cores by their bits (:data:`WIDEN_E4M3_PTX`: byte permutes, integer
masks and shifts, and a packed bf16 multiply by 2^120, exact), not by Triton's conversion (launch suffix ``_c``),
which on sm_90 takes two conversion-rate instructions a weight.

On CPU only Triton's interpreter runs it (``TRITON_INTERPRET=1``), for the tests.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from modules.decode_attention import check_device, counters, interpreted, processors, triton
from modules.fp8 import FP8

if triton is not None:
    import triton.language as tl

    from modules.decode_attention import _arrives_last, _rearm


MAX_ROWS = 64  # rows per program; more rows read the weights once per 64 (the engine then uses F.linear instead)


class LinearLaunch(NamedTuple):
    """A launch configuration, named ``triton_lin_n<block_n>_k<block_k>_s<split_k>_w<warps>_p<stages>`` (``s0``: the
    splits of :func:`auto_split`), then ``_m<block_m>`` where set, ``_l`` for ``last`` and ``_c`` for ``cast``."""

    # the op's defaults: decode_linear's signature spells them out (a custom op's schema needs literals)
    block_n: int = 64  # output columns per program (the input is read once per column block: 32 rows / 64 columns
    # reads half as many bytes of input, from L2, as of weights)
    block_k: int = 128  # inner-dimension elements per loop iteration
    split_k: int = 0  # programs along the inner dimension (> 1: a second kernel sums their parts); 0: auto_split
    warps: int = 4
    stages: int = 3  # blocks of weights in flight per program
    last: bool = False  # the last program of a split tile sums the splits, no second kernel (name suffix _l)
    cast: bool = False  # fp8 weights widened by Triton's own conversion, not by their bits (name suffix _c)
    block_m: int = 0  # rows per program (name part _m<block_m>); 0: the rows' power of two, 16 to MAX_ROWS. On sm_90
    # 64 makes Triton multiply with warpgroup wgmma (64-row tiles; 32 rows leave half of each tile empty), which
    # takes an fp8 weight from registers to shared memory once, where the 32-row mma path moves the input around it

    @classmethod
    def of(cls, choice: str) -> LinearLaunch | None:
        """The launch of a Triton ``linear`` choice: ``None`` for ``triton`` (the defaults), else the parsed name; a
        ``ValueError`` that names the choices for anything else (``torch`` is not a Triton choice)."""
        if choice == "triton":
            return None
        try:
            return cls.parse(choice)
        except ValueError as error:
            raise ValueError(f"linear must be torch, triton or a launch name ({error})") from None

    @classmethod
    def parse(cls, name: str) -> LinearLaunch:
        match = re.fullmatch(r"triton_lin_n(\d+)_k(\d+)_s(\d+)_w(\d+)_p(\d+)(?:_m(\d+))?(_l)?(_c)?", name)
        if match is None:
            raise ValueError(f"a triton linear launch is named triton_lin_n<block_n>_k<block_k>_s<split_k>_w<warps>"
                             f"_p<stages>, then _m<block_m> for block_m, _l for last=True and _c for cast=True, got "
                             f"{name!r}")
        *numbers, block_m, last, cast = match.groups()
        return cls(*map(int, numbers), last=last is not None, cast=cast is not None,
                   block_m=int(block_m or 0)).checked()

    def checked(self) -> LinearLaunch:
        """Itself; raises a ``ValueError`` that names the value out of range."""
        for field in ("block_n", "block_k", "warps"):
            value = getattr(self, field)
            if value < 1 or value & (value - 1) or (field != "warps" and value < 16):
                raise ValueError(f"decode_linear: {field} must be a power of 2 (block_n and block_k at least 16, "
                                 f"for the tensor cores), got {field}={value}")
        if self.block_m and (self.block_m & (self.block_m - 1) or not 16 <= self.block_m <= MAX_ROWS):
            raise ValueError(f"decode_linear: block_m must be 0 (the rows') or a power of 2 from 16 to {MAX_ROWS}, "
                             f"got block_m={self.block_m}")
        if self.split_k < 0 or self.stages < 1:
            raise ValueError(f"decode_linear: split_k must be >= 0 (0: auto) and stages >= 1, got "
                             f"split_k={self.split_k}, stages={self.stages}")
        return self

    @property
    def name(self) -> str:
        return (f"triton_lin_n{self.block_n}_k{self.block_k}_s{self.split_k}_w{self.warps}_p{self.stages}"
                + (f"_m{self.block_m}" if self.block_m else "") + ("_l" if self.last else "")
                + ("_c" if self.cast else ""))


# e4m3 -> bf16 by the bits, four weights (one 32-bit register, $2) to two registers of two bf16 each ($0, $1). Each
# byte goes to the top of a 16-bit lane (prmt: bytes 0 and 1 to the low register's lanes, 2 and 3 to the high's);
# the sign stays, the exponent and mantissa move 4 bits right. That is the bf16 whose bits are the e4m3's with 4 more
# exponent bits: the weight times 2^-120 (bias 127 against 7), an e4m3 subnormal a bf16 subnormal. One packed
# bf16 fma by 2^120 (0x7B80), plus -0 (0x8000, which keeps a -0 weight's sign), restores the weight exactly: a
# power of two, and bf16 arithmetic keeps subnormals (it has no .ftz). The two NaN codes (0x7f, 0xff) come out as
# +-480: :func:`modules.fp8.quantize` never writes them. fma.rn.bf16x2 needs sm_80; the fp8 weights sm_89.
WIDEN_E4M3_PTX = """{
.reg .b32 lo, hi, sign_lo, sign_hi, two120, minus0;
mov.b32 two120, 0x7B807B80;
mov.b32 minus0, 0x80008000;
prmt.b32 lo, $2, 0, 0x1404;
prmt.b32 hi, $2, 0, 0x3424;
and.b32 sign_lo, lo, 0x80008000;
and.b32 sign_hi, hi, 0x80008000;
shr.b32 lo, lo, 4;
shr.b32 hi, hi, 4;
and.b32 lo, lo, 0x07F007F0;
and.b32 hi, hi, 0x07F007F0;
or.b32 lo, lo, sign_lo;
or.b32 hi, hi, sign_hi;
fma.rn.bf16x2 $0, lo, two120, minus0;
fma.rn.bf16x2 $1, hi, two120, minus0;
}"""

if triton is not None:
    _WIDEN_E4M3_PTX = tl.constexpr(WIDEN_E4M3_PTX)  # (a jit function reads only constexpr globals)

    @triton.jit
    def _widen(b, WEIGHT: tl.constexpr, BITS: tl.constexpr):
        """``b`` in ``WEIGHT``; BITS: ``b`` is e4m3, widened to bf16 by :data:`WIDEN_E4M3_PTX`. Triton's own
        conversion (``b.to(tl.bfloat16)``) widens e4m3 pairs to f16 pairs, then each f16 to bf16 on its own
        (F2F.BF16.F16 in sm_90's SASS): two conversion-rate instructions a weight, where the bits take integer and
        packed-bf16 ones. On a GPU only (the interpreter runs no PTX; it widens to float32, exactly)."""
        if BITS:
            return tl.inline_asm_elementwise(_WIDEN_E4M3_PTX, "=r,=r,r", [b.to(tl.uint8, bitcast=True)],
                                             dtype=tl.bfloat16, is_pure=True, pack=4)
        return b.to(WEIGHT)

    @triton.jit
    def _round(y, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
        """float32 ``y`` rounded to ``DTYPE`` to nearest, ties to even, as float32. EMULATE: by its bits, for the
        interpreter, whose conversion to bf16 cuts the low bits off instead (GPUs round)."""
        if EMULATE and DTYPE == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return y.to(DTYPE).to(tl.float32)

    @triton.jit
    def _finish(acc, up, residual, out, scale, rows, cols, cols_n, mask, stride_rm, stride_om,
                GATED: tl.constexpr, RESIDUAL: tl.constexpr, WEIGHT: tl.constexpr, EMULATE: tl.constexpr,
                SCALED: tl.constexpr):
        """The epilogue of both kernels: the rows' scales (SCALED: an fp8 weight), the eager calls' roundings, then
        the store. ``WEIGHT``: the dtype the linear computes in (the weight's; bf16 for an fp8 weight)."""
        if SCALED:  # sum(x * q) * s: the scale of each output row (the gate's, then the up's rows below)
            acc *= tl.load(scale + cols, mask=cols < cols_n, other=0.0)[None, :]
            if GATED:
                up *= tl.load(scale + cols_n + cols, mask=cols < cols_n, other=0.0)[None, :]
        y = _round(acc, WEIGHT, EMULATE)  # F.linear's output, in the weight's dtype
        if GATED:  # F.silu(gate) * up, each rounded to the weight's dtype as the eager ops are
            silu = _round(y / (1.0 + tl.exp(-y)), WEIGHT, EMULATE)
            y = _round(silu * _round(up, WEIGHT, EMULATE), WEIGHT, EMULATE)
        if RESIDUAL:
            y += tl.load(residual + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if out.dtype.element_ty != tl.float32:
            y = _round(y, out.dtype.element_ty, EMULATE)
        tl.store(out + rows[:, None] * stride_om + cols[None, :], y.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_splits(part, at, mask, plane, SPLIT: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """The splits' float32 sums at ``at`` added up in split order (the same sums at every call); ``plane``:
        elements per split. Read through L2 (``.cg``): other programs wrote them."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for split in tl.static_range(SPLIT):
            acc += tl.load(part + split * plane + at, mask=mask, other=0.0, cache_modifier=".cg")
            if GATED:
                up += tl.load(part + (SPLIT + split) * plane + at, mask=mask, other=0.0, cache_modifier=".cg")
        return acc, up

    @triton.jit
    def _linear(
        x, w, residual, out, part, count, scale, rows_n, cols_n, inner, k_len, stride_xm, stride_wn, stride_rm,
        stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
        SPLIT: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        LAST: tl.constexpr, WEIGHT: tl.constexpr, SCALED: tl.constexpr, CAST: tl.constexpr,
    ):  # WEIGHT: the dtype the linear computes in (w's own; bf16 for an fp8 w, SCALED: with per-row scales); CAST:
        # an fp8 w widened by Triton's conversion, not _widen's bits
        col_block, row_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < rows_n, cols < cols_n
        start = split * k_len
        end = tl.minimum(inner, start + k_len)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        precision: tl.constexpr = "ieee" if IEEE else "tf32"
        for first in tl.range(start, end, BLOCK_K, num_stages=STAGES):
            k = first + tl.arange(0, BLOCK_K)
            in_k = k < end
            a = tl.load(x + rows[:, None] * stride_xm + k[None, :], mask=in_rows[:, None] & in_k[None, :], other=0.0)
            weights = w + cols[:, None] * stride_wn + k[None, :]
            both = in_cols[:, None] & in_k[None, :]
            b = tl.load(weights, mask=both, other=0.0)
            if UPCAST:  # the interpreter multiplies 16-bit floats' raw bits: the same products, exact in float32
                # (UPCAST is the interpreter: _round emulates the GPUs' rounding to bf16 for it)
                a, b = _round(a.to(tl.float32), WEIGHT, True), b.to(tl.float32)
            else:  # autocast's cast of the input to the weight's dtype; an fp8 weight widened (exactly) to bf16
                a, b = a.to(WEIGHT), _widen(b, WEIGHT, SCALED and not CAST)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=precision)
            if GATED:  # the up rows sit cols_n rows below the gate rows
                b = tl.load(weights + cols_n * stride_wn, mask=both, other=0.0)
                b = b.to(tl.float32) if UPCAST else _widen(b, WEIGHT, SCALED and not CAST)
                up = tl.dot(a, tl.trans(b), up, input_precision=precision)
        mask = in_rows[:, None] & in_cols[None, :]
        if SPLIT > 1:  # this split's sums; _sum_parts finishes, or with LAST the tile's last program here
            at = (split * rows_n + rows[:, None]) * cols_n + cols[None, :]
            tl.store(part + at, acc, mask=mask)
            if GATED:
                tl.store(part + SPLIT * rows_n * cols_n + at, up, mask=mask)
            if LAST:
                tile = count + row_block * tl.num_programs(0) + col_block
                if _arrives_last(tile, SPLIT):  # the others' sums are out
                    at = rows[:, None] * cols_n + cols[None, :]
                    acc, up = _add_splits(part, at, mask, rows_n * cols_n, SPLIT, GATED, BLOCK_M, BLOCK_N)
                    _finish(acc, up, residual, out, scale, rows, cols, cols_n, mask, stride_rm, stride_om, GATED,
                            RESIDUAL, WEIGHT, UPCAST, SCALED)
                    _rearm(tile)
        else:
            _finish(acc, up, residual, out, scale, rows, cols, cols_n, mask, stride_rm, stride_om, GATED, RESIDUAL,
                    WEIGHT, UPCAST, SCALED)

    @triton.jit
    def _sum_parts(
        part, residual, out, scale, rows_n, cols_n, stride_rm, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, GATED: tl.constexpr,
        RESIDUAL: tl.constexpr, EMULATE: tl.constexpr, WEIGHT: tl.constexpr, SCALED: tl.constexpr,
    ):
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < rows_n)[:, None] & (cols < cols_n)[None, :]
        at = rows[:, None] * cols_n + cols[None, :]
        acc, up = _add_splits(part, at, mask, rows_n * cols_n, SPLIT, GATED, BLOCK_M, BLOCK_N)
        _finish(acc, up, residual, out, scale, rows, cols, cols_n, mask, stride_rm, stride_om, GATED, RESIDUAL, WEIGHT,
                EMULATE, SCALED)


INTERPRETED_PROCESSORS = 8  # auto_split's processor count where there is no GPU (Triton's interpreter, the tests)


def auto_split(tiles: int, inner: int, block_k: int, device: torch.device) -> int:
    """``split_k=0``: the fewest splits of the inner dimension that give every processor (SM) of ``device`` a
    program, ``tiles`` being the output tiles, and no split shorter than 4 blocks of ``block_k``. (Splits do not
    read more input or weights; their float32 sums cost ``splits * rows * columns * 8`` bytes.)"""
    wanted = triton.cdiv(processors(device) or INTERPRETED_PROCESSORS, tiles)
    return max(1, min(wanted, inner // (4 * block_k)))


_TRITON_DTYPES = {}
if triton is not None:
    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@torch.library.custom_op("bicot::decode_linear", mutates_args=())
def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    gated: bool = False,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 0,
    warps: int = 4,
    stages: int = 3,
    last: bool = False,
    cast: bool = False,
    block_m: int = 0,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T`` in the weight's dtype (``x`` cast to it first, as under autocast); with
    ``residual [M, N]``, ``residual + that`` in the residual's dtype; ``gated``: ``weight`` is ``[gate; up]``
    (``[2N, K]``) and the result ``silu(x @ gate^T) * (x @ up^T)``, ``[M, N]``. Rows and the weight's last dimension
    contiguous. The launch configuration (:class:`LinearLaunch`) changes the speed, not the result, except for
    the order of the float32 sums.

    ``scale``: ``weight`` is float8 e4m3 (:func:`modules.fp8.quantize`) and ``scale`` its float32 scale per row (``[N]``, or
    ``[2N]`` gated): the linear computes in bfloat16, ``x`` rounded to bf16 times the fp8 weights (exact in bf16),
    summed in float32, times the row's scale, rounded to bf16. Half the weight bytes of bf16 to read. The weights
    widen to bf16 by their bits (:data:`WIDEN_E4M3_PTX`), or with ``cast`` by Triton's conversion: the same values.
    """
    check_device(x.device, "linear", "torch")
    LinearLaunch(block_n, block_k, split_k, warps, stages, last, cast, block_m).checked()
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("decode_linear needs the last dimension of x, weight and residual contiguous")
    if (scale is not None) != (weight.dtype == FP8):
        raise ValueError(f"decode_linear: a float8_e4m3fn weight comes with its float32 scale per row and only it does, "
                         f"got a {weight.dtype} weight and scale={'None' if scale is None else 'a tensor'}")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != weight.shape[:1] or scale.stride(0) != 1):
        raise ValueError(f"decode_linear: scale must be float32 [{weight.shape[0]}] and contiguous, got "
                         f"{scale.dtype} {list(scale.shape)}")
    rows, inner = x.shape
    cols = weight.shape[0] // 2 if gated else weight.shape[0]
    compute = torch.bfloat16 if scale is not None else weight.dtype
    dtype = residual.dtype if residual is not None else compute
    out = torch.empty(rows, cols, dtype=dtype, device=x.device)
    block_m = block_m or max(16, min(MAX_ROWS, triton.next_power_of_2(rows)))
    split_k = split_k or auto_split(triton.cdiv(cols, block_n) * triton.cdiv(rows, block_m), inner, block_k, x.device)
    k_len = triton.cdiv(triton.cdiv(inner, split_k), block_k) * block_k  # whole blocks per split
    splits = triton.cdiv(inner, k_len)
    grid = (triton.cdiv(cols, block_n), triton.cdiv(rows, block_m), splits)
    part = out
    if splits > 1:
        part = torch.empty((2 if gated else 1) * splits * rows * cols, dtype=torch.float32, device=x.device)
    res = residual if residual is not None else out  # not read without RESIDUAL
    last = last and splits > 1
    count = counters(x.device, grid[0] * grid[1]) if last else out  # not touched without LAST
    scales = scale if scale is not None else out  # not read without SCALED
    common = dict(GATED=gated, RESIDUAL=residual is not None, WEIGHT=_TRITON_DTYPES[compute], SCALED=scale is not None)
    _linear[grid](
        x, weight, res, out, part, count, scales, rows, cols, inner, k_len, x.stride(0), weight.stride(0),
        res.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, SPLIT=splits,
        IEEE=compute == torch.float32 or interpreted(), UPCAST=interpreted(), LAST=last, CAST=cast, num_warps=warps,
        **common,
    )
    if splits > 1 and not last:
        _sum_parts[grid[:2]](
            part, res, out, scales, rows, cols, res.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
            SPLIT=splits, EMULATE=interpreted(), **common,
        )
    return out


@decode_linear.register_fake
def _(x, weight, residual=None, gated=False, block_n=64, block_k=128, split_k=0, warps=4, stages=3, last=False,
      cast=False, block_m=0, scale=None):
    cols = weight.shape[0] // 2 if gated else weight.shape[0]
    compute = torch.bfloat16 if scale is not None else weight.dtype
    dtype = residual.dtype if residual is not None else compute
    return x.new_empty(x.shape[0], cols, dtype=dtype)
