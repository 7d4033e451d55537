"""The Triton projections (``modules.decode_linear``) against the eager calls they stand in for.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), and are
compiled for sm_80/sm_90 by Triton's own compiler (``tests/triton_aot.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from triton_aot import PRELUDE, compile_here

from modules import decode_attention, decode_linear, fp8

pytestmark = pytest.mark.triton
needs_triton = pytest.mark.skipif(
    not (decode_attention.available() and (torch.cuda.is_available() or decode_attention.interpreted())),
    reason="needs the triton package (and a CUDA device or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LINEAR = decode_linear.decode_linear


def tensors(rows, inner, cols, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)

    return randn(rows, inner), randn(2 * cols, inner, scale=inner**-0.5), randn(rows, cols)


# rows below, at and past one block of rows (16..64), columns and inner sizes that are not multiples of the blocks
SHAPES = [(4, 128, 96), (33, 200, 70), (70, 96, 40)]
# column blocks, inner blocks, splits of the inner dimension (one: one kernel; more: a second sums them)
LAUNCHES = [dict(block_n=16, block_k=32), dict(block_n=32, block_k=64, split_k=3), dict(block_n=64, block_k=16,
                                                                                          split_k=2)]


@needs_triton
@pytest.mark.parametrize(("rows", "inner", "cols"), SHAPES)
def test_float32_equals_the_eager_calls(rows, inner, cols):
    x, weight, residual = tensors(rows, inner, cols, torch.float32)
    gate, up = F.linear(x, weight).chunk(2, -1)
    for launch in [{}, *LAUNCHES]:
        torch.testing.assert_close(LINEAR(x, weight[:cols], **launch), F.linear(x, weight[:cols]))
        torch.testing.assert_close(LINEAR(x, weight[:cols], residual, **launch), residual + F.linear(x, weight[:cols]))
        torch.testing.assert_close(LINEAR(x, weight, None, True, **launch), F.silu(gate) * up)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_last_program_of_a_tile_adds_the_splits_up_as_the_second_kernel_does(dtype):
    """``last=True``: no second kernel; the same sums in the same order, so the same bits, and every arrival
    counter back at zero for the next call (one buffer per device)."""
    calls = 0
    for rows, inner, cols in SHAPES:
        x, weight, residual = tensors(rows, inner, cols, dtype, seed=rows)
        for launch in LAUNCHES:
            for args in ((weight[:cols],), (weight[:cols], residual), (weight, None, True)):
                two_kernels = LINEAR(x, *args, **launch)
                assert torch.equal(LINEAR(x, *args, **launch, last=True), two_kernels), (rows, launch, len(args))
                calls += launch.get("split_k", 1) > 1
    assert calls == 2 * len(SHAPES) * 3
    assert not decode_attention._COUNTERS[x.device].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: programs that run at the same time")
def test_on_a_gpu_the_last_program_reads_every_split_at_the_1b_shapes_call_after_call():
    """Where programs really run concurrently, a missing order between a split's stores and the last program's
    reads would show as a wrong or varying sum: 32 rows through the 1B layer's split projections (o: 2048 x 2048
    with the residual, down: 5632 inner, gate/up gated), 50 calls each, plain and replayed in a CUDA graph, all
    equal to the two-kernel result."""
    generator = torch.Generator().manual_seed(0)
    for inner, cols, residual, gated in ((2048, 2048, True, False), (5632, 2048, True, False), (2048, 5632, False, True)):
        x = torch.randn(32, inner, generator=generator).to(DEVICE, torch.bfloat16)
        weight = (torch.randn((2 if gated else 1) * cols, inner, generator=generator) * inner**-0.5).to(DEVICE,
                                                                                                   torch.bfloat16)
        res = torch.randn(32, cols, generator=generator).to(DEVICE, torch.bfloat16) if residual else None
        want = LINEAR(x, weight, res, gated, split_k=4)
        got = [LINEAR(x, weight, res, gated, split_k=4, last=True) for _ in range(50)]
        graph, outs = torch.cuda.CUDAGraph(), []
        LINEAR(x, weight, res, gated, split_k=4, last=True)  # warm-up outside the capture
        with torch.cuda.graph(graph):
            outs.append(LINEAR(x, weight, res, gated, split_k=4, last=True))
        replayed = []
        for _ in range(50):
            graph.replay()
            replayed.append(outs[0].clone())
        assert all(torch.equal(g, want) for g in got + replayed), (inner, cols)
    assert not decode_attention._COUNTERS[x.device].any()


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).float()


@needs_triton
@pytest.mark.parametrize("launch", [{}, LAUNCHES[1], dict(block_m=64)])
def test_bfloat16_rounds_as_the_eager_calls(launch):
    """In bf16 the eager calls round the matmul's float32 sums to bf16, then the activation and the product (in
    float32 each), or add the residual in float32 and round once. The kernels do the same; only the order of the
    float32 sums differs, so a rounded matmul can land one bf16 step (2^-7 relative) away, and what is computed
    from it moves by as much."""
    rows, inner, cols = 33, 200, 70
    x, weight, residual = tensors(rows, inner, cols, torch.bfloat16)
    sums = x.float() @ weight.float().T  # exact products of bf16 numbers, float32 sums
    gate, up = rounded(sums[:, :cols], torch.bfloat16), rounded(sums[:, cols:], torch.bfloat16)
    silu = rounded(gate * torch.sigmoid(gate), torch.bfloat16)
    step = 2**-7
    cases = {  # name: (kernel, eager arithmetic, bound on the difference)
        "plain": (LINEAR(x, weight[:cols], **launch), gate, step * gate.abs()),
        "residual": (LINEAR(x, weight[:cols], residual, **launch), rounded(residual.float() + gate, torch.bfloat16),
                     step * (gate.abs() + (residual.float() + gate).abs())),
        "gated": (LINEAR(x, weight, None, True, **launch), rounded(silu * up, torch.bfloat16),
                  4 * step * (silu * up).abs()),
    }
    for name, (got, want, bound) in cases.items():
        assert got.dtype == torch.bfloat16, name
        excess = (got.float() - want).abs() - bound
        assert excess.max() <= 1e-6, (name, excess.max())
        assert (got.float() == want).float().mean() > 0.9, name  # most land on the same bf16 number


@needs_triton
def test_a_float32_input_and_residual_with_bfloat16_weights_is_autocasts_arithmetic():
    """Under autocast (``bf16-mixed``) the residual stream is float32 and the weights' copies bf16: ``x + o_proj(h)``
    casts ``h`` to bf16, multiplies, rounds to bf16 and adds in float32."""
    rows, inner, cols = 8, 64, 48
    x, weight, residual = tensors(rows, inner, cols, torch.float32)
    weight = weight.bfloat16()
    got = LINEAR(x, weight[:cols], residual)
    assert got.dtype == torch.float32
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        projected = F.linear(x, weight[:cols].float())
    assert projected.dtype == torch.bfloat16
    # the bf16 projection may land one bf16 step away (the order of its float32 sums), the add is exact to float32
    excess = (got - (residual + projected.float())).abs() - 2**-7 * projected.float().abs()
    assert excess.max() <= 1e-6, excess.max()


@needs_triton
@pytest.mark.parametrize("launch", [{}, *LAUNCHES, dict(LAUNCHES[1], last=True), dict(cast=True),
                                    dict(block_m=64), dict(LAUNCHES[1], block_m=16)])
def test_fp8_weights_are_bf16_arithmetic_on_their_values_times_the_row_scales(launch):
    """``scale``: the fp8 weights widened to bf16 (exactly: by their bits, or ``cast`` by Triton's conversion, on
    a GPU; the interpreter widens to float32), multiplied by the input rounded to bf16, summed in float32, times
    each output row's scale (the gate's and the up's rows their own), rounded to bf16 as the plain bf16 linear's
    sums are; the residual added in its own dtype."""
    rows, inner, cols = 33, 200, 70
    x, weight, residual = tensors(rows, inner, cols, torch.float32)
    q, scale = fp8.quantize(weight)
    sums = (x.bfloat16().float() @ q.float().T) * scale  # [rows, 2 * cols]
    gate, up = rounded(sums[:, :cols], torch.bfloat16), rounded(sums[:, cols:], torch.bfloat16)
    silu = rounded(gate * torch.sigmoid(gate), torch.bfloat16)
    step = 2**-7
    cases = {  # name: (kernel, arithmetic, bound on the difference: the order of the float32 sums)
        "plain": (LINEAR(x, q[:cols], scale=scale[:cols], **launch), gate, step * gate.abs()),
        "residual": (LINEAR(x, q[:cols], residual, scale=scale[:cols], **launch), residual + gate,
                     step * gate.abs() + 1e-6),
        "gated": (LINEAR(x, q, None, True, scale=scale, **launch), rounded(silu * up, torch.bfloat16),
                  4 * step * (silu * up).abs()),
    }
    for name, (got, want, bound) in cases.items():
        assert got.dtype == (torch.float32 if name == "residual" else torch.bfloat16), name
        excess = (got.float() - want).abs() - bound
        assert excess.max() <= 1e-6, (name, excess.max())
        assert (got.float() == want).float().mean() > 0.9, name
    assert (gate - F.linear(x, weight[:cols])).abs().max() > 10 * step  # the quantization shows: not the fp32 weight


@needs_triton
@pytest.mark.parametrize("launch", [{}, dict(cast=True), dict(block_m=64), dict(block_k=16, block_n=16)])
def test_every_fp8_code_reaches_the_output_exactly(launch):
    """One-hot input rows pick single weights out, scale 1: the output is each e4m3 code's value, subnormals and
    the largest included, through the kernel's widening (on a GPU the bits' PTX or, ``cast``, Triton's
    conversion; the products and sums are exact)."""
    codes = torch.arange(256, dtype=torch.uint8).view(fp8.FP8)
    codes = codes[torch.isfinite(codes.float())]  # 254: the NaN codes are never written
    rows, inner, cols = 32, 32, 64
    weight = codes.repeat(rows * cols // len(codes) + 1)[: cols * inner].reshape(cols, inner).to(DEVICE)
    x = torch.eye(rows, inner, dtype=torch.bfloat16, device=DEVICE)  # row m picks inner element m
    got = LINEAR(x, weight, scale=torch.ones(cols, device=DEVICE), **launch)
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), weight.float().T)
    assert (weight.float().abs() < 2**-6).sum() > 50 and weight.float().abs().max() == 448  # subnormals, the top


@needs_triton
def test_fp8_weights_come_with_their_scales():
    x, weight, _ = tensors(4, 64, 16, torch.float32)
    q, scale = fp8.quantize(weight)
    with pytest.raises(ValueError, match="float8_e4m3fn weight comes with its float32 scale per row"):
        LINEAR(x, q)
    with pytest.raises(ValueError, match="got a torch.float32 weight and scale=a tensor"):
        LINEAR(x, weight, scale=scale)
    with pytest.raises(ValueError, match=r"scale must be float32 \[32\] and contiguous, got torch.bfloat16"):
        LINEAR(x, q, scale=scale.bfloat16())


def run_ptx(asm: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PTX instructions that ``decode_linear.WIDEN_E4M3_PTX`` uses, run on numpy ``uint32`` registers (one
    element of the arrays per GPU thread), as the PTX ISA defines them; ``inputs``: ``{"$2": ...}``. Returns the
    registers. fma.rn.bf16x2 is computed exactly in float64 and rounded to bf16 through float32 (the results here
    are exact, so the rounding does not decide them); bf16 subnormals are kept, as PTX's bf16 arithmetic keeps them."""
    regs = dict(inputs)

    def value(operand):
        return regs[operand] if operand in regs else np.uint32(int(operand, 0))

    def bf16_values(bits):  # [..., 2] float64: the low and the high 16-bit lane
        lanes = np.stack([bits & 0xFFFF, bits >> 16], -1).astype(np.uint32) << 16
        return lanes.view(np.float32).astype(np.float64)

    for line in asm.strip().strip("{}").split(";"):
        op, _, rest = line.strip().partition(" ")
        if not op or op == ".reg":
            continue
        dst, *args = (part.strip() for part in rest.split(","))
        a = np.asarray(value(args[0]), np.uint32)
        if op == "mov.b32":
            regs[dst] = a
        elif op in ("and.b32", "or.b32"):
            regs[dst] = (a & value(args[1])) if op == "and.b32" else (a | value(args[1]))
        elif op == "shr.b32":
            regs[dst] = a >> np.uint32(int(args[1]))
        elif op == "prmt.b32":  # bytes 0-3 of a, 4-7 of b; each selector nibble picks one (bit 3: its sign, replicated)
            b = np.broadcast_to(np.asarray(value(args[1]), np.uint32), a.shape)
            pool = np.stack([(word >> np.uint32(8 * i)) & 0xFF for word in (a, b) for i in range(4)])
            out = np.zeros_like(a)
            for i in range(4):
                nibble = (int(args[2], 0) >> (4 * i)) & 0xF
                byte = pool[nibble & 7]
                byte = np.where(byte & 0x80, 0xFF, 0) if nibble & 8 else byte
                out |= byte.astype(np.uint32) << np.uint32(8 * i)
            regs[dst] = out
        elif op == "fma.rn.bf16x2":
            exact = bf16_values(a) * bf16_values(value(args[1])) + bf16_values(value(args[2]))
            bits = exact.astype(np.float32).view(np.uint32)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)  # to nearest, ties to even
            regs[dst] = bits[..., 0] | (bits[..., 1] << 16)
        else:
            raise AssertionError(f"run_ptx does not know {op}")
    return regs


def test_the_bits_widening_gives_every_e4m3_weight_exactly_in_bf16():
    """``WIDEN_E4M3_PTX`` run on every byte, four a register as the kernel packs them (the first weight the lowest
    byte): each finite code comes out as its e4m3 value, subnormals and both zeros included; the NaN codes
    (which :func:`modules.fp8.quantize` never writes) as +-480."""
    codes = np.arange(256, dtype=np.uint8)
    regs = run_ptx(decode_linear.WIDEN_E4M3_PTX, {"$2": codes.view("<u4")})
    lanes = np.stack([regs["$0"] & 0xFFFF, regs["$0"] >> 16, regs["$1"] & 0xFFFF, regs["$1"] >> 16], -1).reshape(-1)
    got = (lanes.astype(np.uint32) << 16).view(np.float32)
    want = torch.from_numpy(codes).view(fp8.FP8).float().numpy()
    finite = np.isfinite(want)
    assert finite.sum() == 254 and (got[finite] == want[finite]).all()
    assert (np.signbit(got) == np.signbit(want)).all()  # -0 (0x80) stays -0
    assert sorted(got[~finite].tolist()) == [-480.0, 480.0]
    assert (want[1:8] > 0).all() and (want[1:8] < 2**-6).all()  # the subnormals were among them


FP8_COMPILE = PRELUDE + """
import triton.language as tl
from modules import decode_linear as dl
ALIGNED = {"x", "w", "residual", "out", "part", "count", "scale", "inner", "k_len", "stride_xm", "stride_wn",
           "stride_rm", "stride_om"}
types = dict(x="*bf16", w="*fp8e4nv", residual="*fp32", out="*bf16", part="*fp32", count="*i32", scale="*fp32")
cases = ((False, False, 1, False, False, 32), (True, False, 2, True, False, 32), (False, True, 4, False, False, 32),
         (False, False, 1, False, True, 32), (True, False, 2, False, True, 32), (False, False, 4, False, False, 64),
         (True, False, 1, False, False, 64))
for arch in (90, 89):
    for gated, residual, split, last, cast, block_m in cases:
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, STAGES=3, SPLIT=split, GATED=gated,
                          RESIDUAL=residual, IEEE=False, UPCAST=False, LAST=last, WEIGHT=tl.bfloat16, SCALED=True,
                          CAST=cast)
        ptx = compile(dl._linear, types, constexprs, arch, ALIGNED, num_warps=4).asm["ptx"]
        loop = ptx[ptx.index("Inner Loop Header"):]  # the loop over the inner dimension, and what follows it
        print(arch, cast, "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no-mma",
              "cp.async" if "cp.async" in ptx else "sync", "cvt-e4m3" if "e4m3" in ptx else "no-cvt",
              "cvt-bf16" if "cvt.rn.bf16.f16" in loop or "cvt.bf16.f16" in loop else "no-cvt-bf16",
              loop.count("fma.rn.bf16x2"), loop.count("prmt.b32"))
        if split > 1 and not last and arch == 90:
            compile(dl._sum_parts, dict(part="*fp32", residual="*fp32", out="*fp32", scale="*fp32"),
                    dict(BLOCK_M=32, BLOCK_N=16, SPLIT=split, GATED=gated, RESIDUAL=residual, EMULATE=False,
                         WEIGHT=tl.bfloat16, SCALED=True), 90, num_warps=4)
try:
    compile(dl._linear, types, constexprs, 80, ALIGNED, num_warps=4)
except Exception as error:
    print("sm_80:", str(error).splitlines()[-1][:120])
"""


def test_the_fp8_kernels_compile_for_hopper_and_ada_and_not_for_ampere():
    """sm_90 and sm_89: the fp8 weights stream through shared memory and widen to bf16 for the tensor cores, by
    their bits (``WIDEN_E4M3_PTX``: no conversion instruction, two packed bf16 fmas for four weights) or with
    ``cast`` by Triton's conversion (on sm_90 e4m3 pairs to f16 pairs, then each f16 to bf16). sm_80 has no
    e4m3 (the engine refuses compute capability below 8.9)."""
    lines = [line.split() for line in compile_here(FP8_COMPILE).strip().splitlines()]
    assert len(lines) == 15, lines
    for i, (arch, cast, mma, loads, e4m3, bf16, fmas, prmts) in enumerate(lines[:14]):
        # 64 rows a program (block_m 64, the last two cases of each arch): Hopper's warpgroup wgmma
        assert arch in ("90", "89") and loads == "cp.async", (arch, cast)
        assert mma == ("wgmma" if arch == "90" and i % 7 >= 5 else "mma"), (i, arch, mma)
        if cast == "True":  # sm_90 then widens each f16 to bf16 (sm_89 goes another way)
            assert e4m3 == "cvt-e4m3" and fmas == "0" and (bf16 == "cvt-bf16") == (arch == "90"), (arch, cast)
        else:  # two prmt and two fma.rn.bf16x2 for every four weights
            assert (e4m3, bf16) == ("no-cvt", "no-cvt-bf16") and int(fmas) > 0 and prmts == fmas, (arch, cast)
    assert lines[14][0] == "sm_80:" and "fp8e4nv not supported" in " ".join(lines[14]), lines[14]


def test_the_automatic_split_gives_every_processor_a_program_and_no_split_under_four_blocks():
    auto, cpu = decode_linear.auto_split, torch.device("cpu")  # 8 processors on CPU (the interpreter)
    assert auto(8, 2048, 128, cpu) == 1  # 8 tiles already give 8 processors one each
    assert auto(3, 4096, 128, cpu) == 3
    assert auto(1, 2048, 128, cpu) == 4  # 8 parts wanted, 4 of 4 blocks each allowed
    assert auto(1, 256, 128, cpu) == 1  # too short to split


def test_a_launch_configuration_is_named_parsed_and_checked():
    Launch = decode_linear.LinearLaunch
    launch = Launch(16, 256, 4, 8, 4)
    assert launch.name == "triton_lin_n16_k256_s4_w8_p4" and Launch.parse(launch.name) == launch
    last = launch._replace(last=True)
    assert last.name == "triton_lin_n16_k256_s4_w8_p4_l" and Launch.parse(last.name) == last
    cast = last._replace(cast=True)
    assert cast.name == "triton_lin_n16_k256_s4_w8_p4_l_c" and Launch.parse(cast.name) == cast
    assert Launch.parse("triton_lin_n64_k128_s0_w4_p3_c") == Launch(cast=True)
    rows = Launch(block_m=64, last=True)
    assert rows.name == "triton_lin_n64_k128_s0_w4_p3_m64_l" and Launch.parse(rows.name) == rows
    # the op's literal defaults are LinearLaunch's
    defaults = [decode_linear.decode_linear._opoverload._schema.arguments[i].default_value for i in range(4, 12)]
    assert tuple(defaults) == tuple(Launch())
    for wrong, message in (("triton_lin_n8_k256_s1_w4_p3", "block_n=8"), ("triton_lin_n16_k96_s1_w4_p3", "block_k=96"),
                           ("triton_lin_n16_k64_s1_w4_p0", "stages=0"), ("lin_n16", "is named triton_lin_n"),
                           ("triton_lin_n64_k128_s0_w4_p3_c_l", "_l for last=True and _c for cast=True"),
                           ("triton_lin_n64_k128_s0_w4_p3_m128", "block_m=128"),
                           ("triton_lin_n64_k128_s0_w4_p3_m48", "block_m=48")):
        with pytest.raises(ValueError, match=message):
            Launch.parse(wrong)


# The kernels compiled for GPUs here: bf16 weights (the tensor cores' path, which the interpreter cannot run) and
# float32, plain, with a residual, gated, one split and several.
COMPILE = PRELUDE + """
import triton.language as tl
from modules import decode_linear as dl
ALIGNED = {"x", "w", "residual", "out", "part", "count", "scale", "inner", "k_len", "stride_xm", "stride_wn",
           "stride_rm", "stride_om"}
for arch in (80, 90):
    for dtype in ("bf16", "fp32"):
        types = {name: "*" + t for name, t in dict(x=dtype, w=dtype, residual=dtype, out=dtype, part="fp32",
                                                   count="i32", scale="fp32").items()}
        weight = dict(WEIGHT=tl.bfloat16 if dtype == "bf16" else tl.float32, SCALED=False)
        for gated, residual, split, last in ((False, False, 1, False), (False, True, 4, False), (True, False, 1, False),
                                             (True, False, 2, False), (False, True, 4, True), (True, False, 2, True)):
            constexprs = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=128, STAGES=3, SPLIT=split, GATED=gated,
                              RESIDUAL=residual, IEEE=dtype == "fp32", UPCAST=False, LAST=last, CAST=False,
                              **weight)
            ptx = compile(dl._linear, types, constexprs, arch, ALIGNED, num_warps=4).asm["ptx"]
            tensor_cores = "mma.sync" in ptx or "wgmma" in ptx
            # after the loop: the synchronisation and the reads of the splits' sums, in order
            tail = ptx[ptx.rindex("cp.async.wait_group"):]
            order = list(re.findall(r"bar\\.sync|atom\\.global\\.[.\\w]+|ld\\.global\\.cg", tail))
            order = [op for i, op in enumerate(order) if i == 0 or op != order[i - 1]]
            print(arch, dtype, gated, residual, split, last, ",".join(order) or "-", "mma" if tensor_cores else "no-mma",
                  "cp.async" if "cp.async" in ptx else "sync-loads")
            if split > 1 and not last:
                compile(dl._sum_parts, dict(part="*fp32", residual="*" + dtype, out="*" + dtype, scale="*fp32"),
                        dict(BLOCK_M=32, BLOCK_N=16, SPLIT=split, GATED=gated, RESIDUAL=residual, EMULATE=False,
                             **weight), arch, num_warps=4)
"""


def test_the_kernels_compile_for_ampere_and_hopper_gpus_with_tensor_cores_and_a_pipelined_loop():
    lines = compile_here(COMPILE).strip().splitlines()
    assert len(lines) == 2 * 2 * 6, lines
    for line in lines:
        arch, dtype, gated, residual, split, last, order, mma, loads = line.split()
        assert loads == "cp.async", line  # 3 stages: the weights stream through shared memory
        # bf16 on the tensor cores; float32 as F.linear computes it (IEEE products, not TF32), on the FMA units
        assert mma == ("mma" if dtype == "bf16" else "no-mma"), line
        if last == "True":
            # every thread's sums stored (barrier), the arrival counted with acquire-release order at GPU scope,
            # its count shared (barrier), then the last program reads the splits' sums through L2, and zeroes
            # the counter without ordering
            assert order == ("bar.sync,atom.global.gpu.acq_rel.add.u32,bar.sync,ld.global.cg,"
                             "atom.global.gpu.relaxed.exch.b32"), line
        else:
            assert "atom" not in order and "ld.global.cg" not in order, line
