"""``modules.fp8``: each vector along the last dimension as float8 (e4m3) with its own float32 scale."""

from __future__ import annotations

import torch

from modules import fp8


def test_each_vector_is_rounded_to_float8_within_half_a_step_of_its_scale():
    generator = torch.Generator().manual_seed(5)
    # a weight's rows and a cache's head vectors, of every magnitude, with an all-zero one (a pad slot)
    for x in (torch.randn(40, 96, generator=generator) * torch.logspace(-4, 2, 40)[:, None],
              torch.randn(3, 2, 40, 24, generator=generator) * torch.logspace(-3, 2, 40)[:, None]):
        x[..., 7, :] = 0.0
        q, scale = fp8.quantize(x)
        assert q.dtype == fp8.FP8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
        zero = x.abs().amax(-1) == 0
        assert (scale[zero] == 1).all() and not q[zero].float().any()
        assert torch.equal(q.float().abs().amax(-1)[~zero], torch.full_like(scale[~zero], fp8.FP8_MAX))
        # e4m3: 3 mantissa bits (half a step is 2^-4 of the value), subnormal steps of 2^-9 below 2^-6, x the scale
        bound = torch.maximum(x.abs() * 2**-4, 2**-10 * scale[..., None]) * (1 + 1e-6)
        assert ((fp8.dequantize(q, scale) - x).abs() <= bound).all()
        q2, scale2 = torch.empty_like(q), torch.empty_like(scale)
        assert fp8.quantize(x, q2, scale2)[0] is q2
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale2, scale)


def test_the_float8_bits_are_those_of_the_clamped_division_in_float32():
    """No clamp, no float32 copy of ``x`` before the division, the conversion written into ``out``: the same bits
    as the plain recipe (``x.float() / scale``, clamped to +-448, then converted), for bf16 weights and float32
    activations, where the division lands a little past 448 too."""
    generator = torch.Generator().manual_seed(11)
    past = 0
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(4096, 64, generator=generator) * torch.logspace(-6, 3, 4096)[:, None]).to(dtype)
        x[5] = 0.0
        amax = x.abs().amax(-1, keepdim=True).float()
        step = torch.where(amax > 0, amax / fp8.FP8_MAX, torch.ones_like(amax))
        divided = x.float() / step
        past += int((divided.abs() > fp8.FP8_MAX).sum())
        plain = divided.clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
        q, scale = fp8.quantize(x, torch.empty(x.shape, dtype=fp8.FP8), torch.empty(x.shape[:-1]))
        assert torch.equal(q.view(torch.uint8), plain.view(torch.uint8)) and torch.equal(scale, step.squeeze(-1))
        assert not q.float().isnan().any()
    assert past > 0  # the case the clamp would have caught does occur, and converts to 448 all the same
