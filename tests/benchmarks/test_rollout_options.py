"""benchmarks/rollout.py's --compile entries: a mode with '+'-joined engine options (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from rollout import engine_options  # noqa: E402


def test_an_entry_names_the_mode_the_attention_and_packing():
    assert engine_options("fused") == dict(compile="fused")
    assert engine_options("fused+pack+triton") == dict(compile="fused", pack=True, attention="triton")


def test_a_triton_launch_from_the_kernel_sweep_picks_triton_at_that_configuration():
    # the name decode_kernels.py --triton-sweep prints in its triton_best line
    assert engine_options("fused+pack+triton_s64_b64_w8_p2") == dict(
        compile="fused", pack=True, attention="triton", triton_launch="triton_s64_b64_w8_p2")


def test_triton_projections_by_default_or_at_a_launch_from_the_linear_sweep():
    assert engine_options("fused+pack+triton+triton_lin") == dict(compile="fused", pack=True, attention="triton",
                                                                  linear="triton")
    assert engine_options("fused+pack+triton_s128_b32_w4_p1_m+triton_lin_n16_k256_s0_w4_p4") == dict(
        compile="fused", pack=True, attention="triton", triton_launch="triton_s128_b32_w4_p1_m",
        linear="triton_lin_n16_k256_s0_w4_p4")


def test_fp8_weights_and_cache_and_the_least_bytes_they_read():
    from rollout import lm_bytes

    from modules.tiny import TinyJanusSpec, build_tiny_janus

    assert engine_options("fused+pack+triton+triton_lin+fp8") == dict(compile="fused", pack=True, attention="triton",
                                                                      linear="triton", weights="fp8")
    assert engine_options("fused+triton+fp8kv") == dict(compile="fused", attention="triton", kv="fp8")
    model = build_tiny_janus(TinyJanusSpec())[0]
    layers = model.model.language_model.layers
    projections = [m for layer in layers for m in (*layer.self_attn.children(), *layer.mlp.children())
                   if isinstance(m, torch.nn.Linear)]
    assert len(projections) == 7 * len(layers)
    # fp32 weights: 4 bytes each become 1, plus a 4-byte scale per row
    saved = sum(3 * m.weight.numel() - 4 * m.weight.shape[0] for m in projections)
    assert lm_bytes(model) - lm_bytes(model, fp8=True) == saved > 0


@pytest.mark.parametrize(("spec", "message"), [
    ("fast", "unknown mode 'fast'"),
    ("fused+pack+pack", "unknown or repeated option 'pack'"),
    ("fused+triton+triton_s64_b64_w8_p2", "unknown or repeated option 'triton_s64_b64_w8_p2'"),
    ("fused+triton_s64_b48_w8_p2", "block and warps must be powers of 2"),
    ("fused+pack+triton_lin+triton_lin", "unknown or repeated option 'triton_lin'"),
    ("fused+pack+triton_lin_n8_k64_s0_w4_p3", "block_n must be a power of 2"),
])
def test_a_wrong_entry_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        engine_options(spec)
