"""The Triton projections (``modules.decode_linear``) against the eager calls they stand in for.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), and are
compiled for sm_80/sm_90 by Triton's own compiler (``tests/triton_aot.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_aot import PRELUDE, compile_here

from modules import decode_attention, decode_linear

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


def rounded(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).float()


@needs_triton
@pytest.mark.parametrize("launch", [{}, LAUNCHES[1]])
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
    # the op's literal defaults are LinearLaunch's
    defaults = [decode_linear.decode_linear._opoverload._schema.arguments[i].default_value for i in range(4, 9)]
    assert tuple(defaults) == tuple(Launch())
    for wrong, message in (("triton_lin_n8_k256_s1_w4_p3", "block_n=8"), ("triton_lin_n16_k96_s1_w4_p3", "block_k=96"),
                           ("triton_lin_n16_k64_s1_w4_p0", "stages=0"), ("lin_n16", "is named triton_lin_n")):
        with pytest.raises(ValueError, match=message):
            Launch.parse(wrong)


# The kernels compiled for GPUs here: bf16 weights (the tensor cores' path, which the interpreter cannot run) and
# float32, plain, with a residual, gated, one split and several.
COMPILE = PRELUDE + """
from modules import decode_linear as dl
ALIGNED = {"x", "w", "residual", "out", "part", "inner", "k_len", "stride_xm", "stride_wn", "stride_rm", "stride_om"}
for arch in (80, 90):
    for dtype in ("bf16", "fp32"):
        types = {name: "*" + t for name, t in dict(x=dtype, w=dtype, residual=dtype, out=dtype, part="fp32").items()}
        for gated, residual, split in ((False, False, 1), (False, True, 4), (True, False, 1), (True, False, 2)):
            constexprs = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=128, STAGES=3, SPLIT=split, GATED=gated,
                              RESIDUAL=residual, IEEE=dtype == "fp32", UPCAST=False)
            ptx = compile(dl._linear, types, constexprs, arch, ALIGNED, num_warps=4).asm["ptx"]
            tensor_cores = "mma.sync" in ptx or "wgmma" in ptx
            print(arch, dtype, gated, residual, split, "mma" if tensor_cores else "no-mma",
                  "cp.async" if "cp.async" in ptx else "sync-loads")
            if split > 1:
                compile(dl._sum_parts, dict(part="*fp32", w="*" + dtype, residual="*" + dtype, out="*" + dtype),
                        dict(BLOCK_M=32, BLOCK_N=16, SPLIT=split, GATED=gated, RESIDUAL=residual, EMULATE=False), arch,
                        num_warps=4)
"""


def test_the_kernels_compile_for_ampere_and_hopper_gpus_with_tensor_cores_and_a_pipelined_loop():
    lines = compile_here(COMPILE).strip().splitlines()
    assert len(lines) == 2 * 2 * 4, lines
    for line in lines:
        arch, dtype, *_, mma, loads = line.split()
        assert loads == "cp.async", line  # 3 stages: the weights stream through shared memory
        # bf16 on the tensor cores; float32 as F.linear computes it (IEEE products, not TF32), on the FMA units
        assert mma == ("mma" if dtype == "bf16" else "no-mma"), line
