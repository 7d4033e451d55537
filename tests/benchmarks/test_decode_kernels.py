"""The decode-kernel candidates (benchmarks/decode_kernels.py, the engine's attention choices) agree (CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import decode_kernels as dk  # noqa: E402
from fp8_values import fp8_exact  # noqa: E402

from modules import decode_attention, decode_linear, fp8  # noqa: E402
from modules.decode_step import ATTENTION  # noqa: E402


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


@pytest.mark.skipif(not (decode_attention.available() and decode_attention.interpreted()),
                    reason="needs the triton package and TRITON_INTERPRET=1 (on CPU)")
def test_triton_projections_equal_the_separate_ones(layers):
    """The ``triton_lin_*`` candidates: the packed weights through ``modules.decode_linear``, residual adds and the
    MLP's activation inside the kernels; one launch per way to split the inner dimension (the splits added up by the
    last program of each tile)."""
    launches = dk.linear_launches(sweep_args("--device", "cpu", "--linear-launches",
                                             "triton_lin_n16_k64_s1_w4_p3,triton_lin_n32_k32_s3_w4_p2_l"))
    assert [launch.name for launch in launches] == ["triton_lin_n16_k64_s1_w4_p3", "triton_lin_n32_k32_s3_w4_p2_l"]
    for launch in launches:
        for i in range(layers.layers):
            torch.testing.assert_close(dk.linear_triton(layers.x, layers.packed[i], layers.split, launch),
                                       dk.linear_separate(layers.x, layers.separate[i]), rtol=1e-5, atol=1e-5)


def test_the_fp8_candidate_is_the_triton_projections_on_the_dequantized_weights(layers):
    """``triton_lin_fp8``: the packed weights quantized per row (``engine_weights: fp8``), through the same kernels:
    on weights that float8 holds with power-of-two scales, bit for bit the kernels on their bf16 copies."""
    exact = [{name: fp8_exact(w) for name, w in layer.items()} for layer in layers.packed]
    quantized = dk.quantized(exact)
    for i in range(layers.layers):
        assert all(torch.equal(fp8.dequantize(*quantized[i][n]), exact[i][n]) for n in exact[i])
        bf16 = {name: w.bfloat16() for name, w in exact[i].items()}
        x = layers.x.bfloat16()
        assert torch.equal(dk.linear_triton(x, quantized[i], layers.split), dk.linear_triton(x, bf16, layers.split))


def test_the_linear_sweep_starts_at_the_default_launch():
    default = decode_linear.LinearLaunch()
    assert dk.linear_launches(sweep_args("--device", "cpu")) == [default]
    swept = dk.linear_launches(sweep_args("--device", "cpu", "--linear-sweep"))
    assert swept[0] == default and len(swept) == len(set(swept)) == 38  # the default is one of the grid's 18
    assert swept[1] == default._replace(last=True)  # each beside its _l twin
    assert swept[2] == default._replace(block_m=64)  # then 64-row programs
    assert [launch.last for launch in swept] == [False, True] * 19
    with pytest.raises(SystemExit):
        sweep_args("--device", "cpu", "--linear-launches", "triton_lin_n8_k64_s1_w4_p3")  # block_n under 16


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


def sweep_args(*argv: str):
    saved = sys.argv
    sys.argv = ["decode_kernels.py", *argv]
    try:
        return dk.parse_args()
    finally:
        sys.argv = saved


def test_triton_sweep_times_every_launch_configuration_with_no_block_past_its_split():
    names = list(dk.triton_candidates(sweep_args("--device", "cpu", "--triton-sweep")))
    # the engine's own launch (parts=AUTO), splits (64, 128, 256) and parts (1, 2, 4, 8), each with blocks 32 and 64
    # x 3 warps x 3 stages, and at each of the 7 sizes the loop that merges each block (_m) and the last program's
    # merge (_l) at the engine's block, warps and stages
    assert len(names) == 1 + 7 * 2 * 3 * 3 + 7 + 7 == len(set(names))
    assert names[0] == dk.engine_triton() == "triton_a128_b32_w4_p2"  # the engine's own configuration first
    assert "triton_s64_b64_w8_p1" in names and "triton_n4_b64_w2_p2" in names and "triton_n1_b32_w4_p3" in names
    da = decode_attention
    engine = f"_b{da.BLOCK}_w{da.WARPS}_p{da.STAGES}"
    sizes = ["s64", "s128", "s256", "n1", "n2", "n4", "n8"]
    # the references first, so that a sweep cut short by its limit has them: the engine's loop, the _m loop and the
    # engine's loop with the last program's merge
    assert names[1:22] == [f"triton_{size}{engine}{loop}" for size in sizes for loop in ("", "_m", "_l")]
    args = sweep_args("--device", "cpu", "--triton-splits", "32", "--triton-blocks", "32,64")
    assert "triton_s32_b64_w4_p1" not in dk.triton_candidates(args)  # no block past its split
    # without --triton-sweep only the splits vary, at the engine's block, warps and stages, with both loops
    plain = dk.triton_candidates(sweep_args("--device", "cpu"))
    assert list(plain) == [dk.engine_triton()] + [f"triton_s{s}{engine}{loop}" for s in (64, 128, 256, 1024)
                                                  for loop in ("", "_m", "_l")]
    with pytest.raises(SystemExit):
        sweep_args("--device", "cpu", "--triton-blocks", "48")  # not a power of 2


@pytest.mark.skipif(not (decode_attention.available() and decode_attention.interpreted()),
                    reason="needs the triton package and TRITON_INTERPRET=1 (on CPU)")
def test_triton_launch_configurations_equal_the_engines_default(layers):
    window = 40
    bias, slot = layers.bias(window), layers.slot(window)
    keys, values = layers.keys[0][:, :, :window], layers.values[0][:, :, :window]
    args = sweep_args("--device", "cpu", "--triton-splits", "16,64", "--triton-parts", "3", "--triton-blocks", "16,32",
                      "--triton-warps", "2", "--triton-stages", "1")
    candidates = dk.triton_candidates(args)
    engine = f"_b{decode_attention.BLOCK}_w{decode_attention.WARPS}_p{decode_attention.STAGES}"
    references = [f"triton_{size}{engine}{loop}" for size in ("s16", "s64", "n3") for loop in ("", "_m", "_l")]
    assert list(candidates) == [dk.engine_triton(), *references, "triton_s16_b16_w2_p1", "triton_s64_b16_w2_p1", "triton_s64_b32_w2_p1",
                                "triton_n3_b16_w2_p1", "triton_n3_b32_w2_p1"]
    expected = ATTENTION["matmul"](layers.query, keys, values, bias, layers.dim**-0.5)
    for attend in candidates.values():
        got = attend(layers.query, keys, values, bias, layers.dim**-0.5, layers.pad, slot)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_tuned_attention_adds_the_last_programs_merge_where_it_won_at_the_same_size():
    engine = decode_attention.Launch(split=128, parts=0).name  # the engine's block, warps, stages at split 128
    assert engine == "triton_s128_b32_w4_p2"
    timings = {384: {engine: 20.0, engine + "_l": 18.0, "triton_s128_b64_w8_p2": 15.0, "triton_n4_b32_w4_p2": 25.0,
                     "triton_n4_b32_w4_p2_l": 30.0, "matmul_compiled": 30.0}}
    assert dk.tuned_attention(timings) == "triton_s128_b64_w8_p2_l"  # _l won at split 128
    timings[384]["triton_n4_b64_w8_p2"] = 14.0  # the best now cuts rows in 4 parts, where _l lost
    assert dk.tuned_attention(timings) == "triton_n4_b64_w8_p2"
    timings[384]["triton_s64_b32_w2_p1_l"] = 10.0  # the best already merges in its last program
    assert dk.tuned_attention(timings) == "triton_s64_b32_w2_p1_l"
    assert dk.tuned_attention({384: {"matmul_compiled": 30.0}}) is None


def test_the_best_triton_line_compares_with_the_engine_and_matmul(capsys):
    engine = dk.engine_triton()
    dk.report_best({384: {"matmul_compiled": 30.0, engine: 24.0, "triton_s64_b64_w8_p2": 12.0, "sdpa": 5.0}},
                   "triton_best", window=384)
    line = json.loads(capsys.readouterr().out)
    assert (line["measure"], line["window"], line["impl"], line["configurations"]) == (
        "triton_best", 384, "triton_s64_b64_w8_p2", 2)
    assert (line["speedup_vs_engine"], line["speedup_vs_matmul_compiled"]) == (2.0, 2.5)
    assert dk.report_best({384: {"matmul": 1.0}}) is None  # no triton candidate measured: no line
    assert capsys.readouterr().out == ""


def test_the_best_triton_configuration_overall_counts_every_window(capsys):
    engine = dk.engine_triton()
    timings = {128: {engine: 10.0, "triton_s64_b64_w8_p2": 6.0, "triton_s32_b32_w2_p1": 1.0, "matmul_compiled": 9.0},
               640: {engine: 40.0, "triton_s64_b64_w8_p2": 20.0}}  # s32 failed at 640: not counted
    assert dk.report_best(timings) == "triton_s64_b64_w8_p2"
    line = json.loads(capsys.readouterr().out)
    assert (line["measure"], line["us"], line["engine_us"], line["speedup_vs_engine"], line["windows"]) == (
        "triton_best_overall", 26.0, 50.0, 1.923, [128, 640])
    assert line["matmul_compiled_us"] is None  # not measured at every window: no comparison


def test_a_sweep_cut_short_is_ranked_from_its_log(tmp_path):
    lines = [
        {"measure": "setup"},
        *({"measure": "decode_kernels", "part": "attention", "impl": impl, "window": w, "us_per_step": us}
          for impl, w, us in [("matmul", 384, 9.0), ("matmul", 640, 9.0), ("triton_n4_b32_w2_p2", 384, 3.0),
                              ("triton_n4_b32_w2_p2", 640, 5.0), ("triton_s64_b32_w2_p1", 384, 1.0)]),
        {"measure": "decode_kernels", "part": "attention", "impl": "triton_s64_b32_w2_p1", "window": 640,
         "error": "OutOfResources"},
    ]
    log = tmp_path / "sweep.log"
    log.write_text("noise\n" + "\n".join(json.dumps(line) for line in lines) + "\n")
    timings = dk.timings_from_log(log)
    assert timings == {384: {"matmul": 9.0, "triton_n4_b32_w2_p2": 3.0, "triton_s64_b32_w2_p1": 1.0},
                       640: {"matmul": 9.0, "triton_n4_b32_w2_p2": 5.0}}
    assert dk.best_triton(timings) == ("triton_n4_b32_w2_p2", {"triton_n4_b32_w2_p2": 8.0})


def test_the_best_triton_projections_are_named_only_where_they_beat_cublas(tmp_path):
    lines = [{"measure": "decode_kernels", "part": "linear", "impl": impl, "us_per_step": us}
             for impl, us in [("separate", 900.0), ("packed", 800.0), ("triton_lin_n64_k128_s0_w4_p3", 700.0),
                              ("triton_lin_n32_k64_s0_w4_p4", 650.0)]]
    lines.append({"measure": "decode_kernels", "part": "linear", "impl": "triton_lin_n128_k256_s0_w4_p4",
                  "error": "OutOfResources: out of resource: shared memory"})
    lines.append({"measure": "decode_kernels", "part": "attention", "impl": "matmul", "window": 384, "us_per_step": 9.0})
    log = tmp_path / "sweep.log"
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    timings = dk.timings_from_log(log, "linear")
    assert timings == {"separate": 900.0, "packed": 800.0, "triton_lin_n64_k128_s0_w4_p3": 700.0,
                       "triton_lin_n32_k64_s0_w4_p4": 650.0}
    assert dk.best_linear(timings) == "triton_lin_n32_k64_s0_w4_p4"
    assert dk.best_linear({**timings, "packed": 600.0}) is None  # cuBLAS faster: none
    assert dk.best_linear({"packed": 1.0}) is None
    # the fp8 candidate reads other weights: never the launch to take, however fast
    fp8 = {name: 300.0 for name in dk.FP8_CANDIDATES}
    assert dk.best_linear({**timings, **fp8}) == "triton_lin_n32_k64_s0_w4_p4"
    assert dk.timings_from_log(log) == {384: {"matmul": 9.0}}  # the attention part, by window
