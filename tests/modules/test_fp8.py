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
