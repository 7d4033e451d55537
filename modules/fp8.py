"""Float8 (e4m3) copies for the rollout engine's ``weights="fp8"`` and ``kv="fp8"``: each vector along the last
dimension (a weight's row, a cached key's or value's head vector) with its own float32 scale. No Triton here: the
engine quantizes with these outside and inside its step, the kernels read what they write."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # its largest finite value


def quantize(x: torch.Tensor, out: torch.Tensor | None = None, scale: torch.Tensor | None = None):
    """``x [..., D]`` as float8 ``q`` and float32 ``scale [...]``: ``q * scale[..., None]`` approximates ``x``, each
    vector scaled so its largest magnitude is e4m3's largest (448); an all-zero vector (a pad slot) gets scale 1.
    Written into ``out``/``scale`` when given (fixed addresses for captured graphs). Returns ``(q, scale)``.

    Three passes over a 16-bit ``x`` (the engine quantizes every decoder projection of the 7B model at each
    sampling call, about 6 G elements): the largest magnitude (a reduction, no ``abs`` copy), the division (one
    float32 temporary: ``x`` is promoted, not copied first) and the conversion, written straight into ``out``.
    No clamp: ``|x| / scale`` is at most 448 times ``1 + 2^-22`` (the rounding of the scale and of the division),
    which e4m3fn's conversion rounds to 448 (it gives NaN only from 464 up)."""
    x = x.detach()
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).float()  # exact: one of x's magnitudes
    step = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    scaled = x / step  # float32
    step = step.squeeze(-1)
    if out is None:
        return scaled.to(FP8), step
    out.copy_(scaled)
    scale.copy_(step)
    return out, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale[..., None]``: what a quantized weight or cache stands for."""
    return q.float() * scale[..., None]
