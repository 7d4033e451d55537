"""The decode-kernel candidates (benchmarks/decode_kernels.py, the engine's attention choices) agree (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import decode_kernels as dk  # noqa: E402

from modules import decode_attention  # noqa: E402
from modules.engine import ATTENTION  # noqa: E402


@pytest.fixture(scope="module")
def layers():
    torch.manual_seed(0)
    return dk.Layers(dk.SHAPES["toy"], rows=6, capacity=48, device=torch.device("cpu"), dtype=torch.float32)


def test_packed_projections_equal_the_separate_ones(layers):
    for i in range(layers.layers):
        separate = dk.linear_separate(layers.x, layers.separate[i])
        packed = dk.linear_packed(layers.x, layers.packed[i], layers.split)
        torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
    assert layers.linear_bytes() == 4 * sum(w.numel() for w in layers.separate[0].values()) * layers.layers


TRITON = pytest.param(
    ATTENTION["triton"],
    marks=pytest.mark.skipif(not (decode_attention.available() and decode_attention.interpreted()),
                             reason="needs the triton package and TRITON_INTERPRET=1 (on CPU)"),
)


@pytest.mark.parametrize("impl", [ATTENTION["sdpa"], ATTENTION["reduce"], torch.compile(ATTENTION["reduce"]), TRITON])
def test_attention_candidates_equal_the_engines_default(layers, impl):
    window = 40
    bias, slot = layers.bias(window), layers.slot(window)
    assert torch.isinf(bias).any() and not torch.isinf(bias[..., -1]).any()  # left padding masked, new token not
    keys, values = layers.keys[0][:, :, :window], layers.values[0][:, :, :window]
    scale = layers.dim**-0.5

    def attend(fn, keys):
        return fn(layers.query, keys, values, bias, scale, layers.pad, slot)

    expected = attend(ATTENTION["matmul"], keys)
    torch.testing.assert_close(attend(impl, keys), expected, rtol=1e-5, atol=1e-5)
    # the masked slots really do not count: changing them changes nothing
    masked = (bias.view(bias.shape[0], -1) == float("-inf"))[:, None, :, None]  # [R, 1, W, 1]
    garbage = torch.where(masked, torch.full_like(keys, 1e4), keys)
    torch.testing.assert_close(attend(impl, garbage), expected, rtol=1e-5, atol=1e-5)
