"""Weights that float8 (e4m3) holds exactly: for tests that compare the fp8 projections bit for bit."""

from __future__ import annotations

import torch

from modules.fp8 import FP8, FP8_MAX


def fp8_exact(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]``'s rows rounded to float8 values times a power of two, with a 448 (e4m3's largest) in column
    0: ``modules.fp8.quantize`` gives them back exactly, with power-of-two scales, and bf16 holds them exactly."""
    step = torch.exp2(torch.round(torch.log2(weight.abs().amax(1, keepdim=True) / FP8_MAX)))  # [N, 1]
    q = (weight / step).clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    q[:, 0] = FP8_MAX
    return (q * step).to(weight.dtype)
