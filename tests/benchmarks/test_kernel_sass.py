"""benchmarks/kernel_sass.py: the SASS parser and classes on a hand-written listing, and the linear kernels compiled
for sm_90 (Triton's CUDA backend, no GPU): the fp8 weights widened by their bits leave no conversion in the loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from triton_aot import compile_here

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_sass as ks  # noqa: E402

# cuobjdump -sass's layout: a forward branch past the loop, the loop 0x30-0x80 and the trap's branch to itself
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
                                                                               /* 0x000fe20000000800 */
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;           /* 0x000000030200720c */
        /*0020*/               @P0 BRA 0xa0 ;                                  /* 0x0000000000200947 */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R6.64] ; /* 0x0000000006047fae */
        /*0040*/                   F2FP.F16.E4M3.UNPACK_B R8, R9 ;             /* 0x00000009ff08723e */
        /*0050*/                   HADD2.F32 R10, -RZ, R8.H0_H0 ;              /* 0x20000008ff0a7230 */
        /*0060*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;    /* 0x000000141010723c */
        /*0070*/                   UIADD3 UR4, UR4, 0x80, URZ ;                /* 0x0000008004047890 */
        /*0080*/              @!P1 BRA 0x30 ;                                  /* 0xfffffffc00e89947 */
        /*0090*/                   BRA 0x90;                                   /* 0xfffffffc00fc7947 */
        /*00a0*/                   EXIT ;                                      /* 0x000000000000794d */
"""
# nvdisasm's: the same branches to labels
LABELLED = (LISTING.replace("BRA 0xa0", "BRA `(.L_x_2)").replace("BRA 0x30", "BRA `(.L_x_0)")
            .replace("BRA 0x90", "BRA `(.L_x_1)").replace("        /*0030*/", ".L_x_0:\n        /*0030*/")
            .replace("        /*0090*/", ".L_x_1:\n        /*0090*/").replace("        /*00a0*/", ".L_x_2:\n        /*00a0*/"))


@pytest.mark.parametrize("listing", [LISTING, LABELLED], ids=["cuobjdump", "nvdisasm"])
def test_the_main_loop_is_the_longest_backward_branch_and_its_instructions_are_classified(listing):
    instructions = ks.parse_sass(listing)
    assert [op.address for op in instructions] == list(range(0, 0xB0, 0x10))
    assert [op.target for op in instructions if op.target is not None] == [0xA0, 0x30, 0x90]
    loop = ks.main_loop(instructions)
    assert [op.opcode for op in loop] == ["LDGSTS.E.BYPASS.128", "F2FP.F16.E4M3.UNPACK_B", "HADD2.F32",
                                          "HMMA.16816.F32.BF16", "UIADD3", "BRA"]
    counts = ks.loop_counts(loop)
    assert counts["loop_instructions"] == 6
    assert counts["loop_classes"] == {"HMMA": 1, "conversion": 1, "fp16x2": 1, "fp32": 0, "integer": 1,
                                      "shared_load": 0, "global": 1, "barrier": 0, "other": 1}
    assert counts["loop_ops"]["HADD2.F32"] == 1
    with pytest.raises(ValueError, match="no loop"):
        ks.main_loop(instructions[:3])


def test_opcode_classes():
    expected = {"F2F.BF16.F16": "conversion", "I2F.U32": "conversion", "HADD2.F32": "fp16x2",
                "HFMA2.BF16_V2": "fp16x2", "FFMA.FTZ": "fp32", "UMOV": "integer", "IMAD.MOV.U32": "integer",
                "LDSM.16.M88.4": "shared_load", "LDGDEPBAR": "barrier", "ULDC.64": "other", "MUFU.EX2": "other"}
    assert {opcode: ks.classify(opcode) for opcode in expected} == expected


def test_without_tritons_cuda_backend_it_says_so_and_exits_2(monkeypatch, capsys):
    backends = pytest.importorskip("triton.backends")
    monkeypatch.delitem(backends.backends, "nvidia", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main sets these: restored after the test
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    monkeypatch.setattr(sys, "argv", ["kernel_sass.py", "--kernels", "linear"])
    with pytest.raises(SystemExit) as exited:
        ks.main()
    assert exited.value.code == 2 and "CUDA backend" in capsys.readouterr().err


def test_the_fp8_linear_loops_widen_by_bits_without_conversions():
    """The ten linear variants compiled for sm_90 (about 15 s): Triton's e4m3 -> bf16 takes conversions in the loop,
    the bits none, with packed bf16 instructions instead; every loop on the tensor cores, nothing spilled; 64-row
    programs on the warpgroup wgmma."""
    out = compile_here("import runpy, sys\nsys.argv = ['kernel_sass.py', '--kernels', 'linear']\n"
                       "runpy.run_path('benchmarks/kernel_sass.py', run_name='__main__')")
    records = {record["variant"]: record for record in map(json.loads, out.splitlines())}
    layouts, weights = ("plain", "gated"), ("bf16", "fp8_bits", "fp8_cast")
    assert list(records) == [f"{layout}_{weight}" for layout in layouts
                             for weight in (*weights, "bf16_m64", "fp8_bits_m64")]
    for name, record in records.items():
        assert record["measure"] == "kernel_sass" and record["kernel"] == "linear" and record["arch"] == 90
        classes = record["loop_classes"]
        assert classes["HMMA"] > 0 and record["spills"] == 0, name
        assert sum(classes.values()) == record["loop_instructions"] == sum(record["loop_ops"].values())
        assert record["warp_instructions_per_kib"] == pytest.approx(4 * record["instructions_per_kib"], abs=0.1)
        assert any(op.startswith("HGMMA") for op in record["loop_ops"]) == name.endswith("m64"), name
        if "bits" in name:
            assert classes["conversion"] == 0 and classes["fp16x2"] > 0, name
            assert any(op.startswith(("HMUL2", "HFMA2")) for op in record["loop_ops"]), name
        if name.endswith("cast"):
            assert classes["conversion"] > 0, name
    for layout in layouts:
        bf16, bits, cast = (records[f"{layout}_{weight}"] for weight in weights)
        assert bf16["bytes_per_iteration"] == 2 * bits["bytes_per_iteration"] == 2 * cast["bytes_per_iteration"]
        # one iteration of the same matmul in each loop (4 warps' share of 32 x 64 x 128, m16n8k16 each)
        assert bf16["loop_classes"]["HMMA"] == bits["loop_classes"]["HMMA"] == cast["loop_classes"]["HMMA"]
    assert records["gated_bf16"]["bytes_per_iteration"] == 2 * records["plain_bf16"]["bytes_per_iteration"] == 32768
    assert records["gated_bf16"]["loop_classes"]["HMMA"] == 2 * records["plain_bf16"]["loop_classes"]["HMMA"] == 64
