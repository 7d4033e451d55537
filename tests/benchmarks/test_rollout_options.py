"""benchmarks/rollout.py's --compile entries: a mode with '+'-joined engine options (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from rollout import engine_options  # noqa: E402


def test_an_entry_names_the_mode_the_attention_and_packing():
    assert engine_options("fused") == dict(compile="fused")
    assert engine_options("fused+pack+triton") == dict(compile="fused", pack=True, attention="triton")


def test_a_triton_launch_from_the_kernel_sweep_picks_triton_at_that_configuration():
    # the name decode_kernels.py --triton-sweep prints in its triton_best line
    assert engine_options("fused+pack+triton_s64_b64_w8_p2") == dict(
        compile="fused", pack=True, attention="triton", triton_launch="triton_s64_b64_w8_p2")


@pytest.mark.parametrize(("spec", "message"), [
    ("fast", "unknown mode 'fast'"),
    ("fused+pack+pack", "unknown or repeated option 'pack'"),
    ("fused+triton+triton_s64_b64_w8_p2", "unknown or repeated option 'triton_s64_b64_w8_p2'"),
    ("fused+triton_s64_b48_w8_p2", "block and warps must be powers of 2"),
])
def test_a_wrong_entry_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        engine_options(spec)
