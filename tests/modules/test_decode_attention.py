"""The Triton decode attention (``attention="triton"``) against the engine's default attention.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``): the same
kernel code, its masks, splits and online softmax, executed on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch
from triton_aot import PRELUDE, compile_here

from modules import decode_attention, fp8
from modules.decode_step import ATTENTION, attention_bias
from modules.engine import RolloutEngine

pytestmark = pytest.mark.triton
needs_triton = pytest.mark.skipif(
    not (decode_attention.available() and (torch.cuda.is_available() or decode_attention.interpreted())),
    reason="needs the triton package (and a CUDA device or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(rows, kv_heads, groups, capacity, dim, dtype=torch.float32, max_pad=20, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    q = randn(rows, kv_heads, groups, dim)
    keys, values = randn(rows, kv_heads, capacity, dim), randn(rows, kv_heads, capacity, dim)
    pad = torch.randint(0, max_pad, (rows,), generator=generator).to(DEVICE)
    return q, keys, values, pad


def reference(q, keys, values, pad, slot, scaling):
    """The engine's default attention, in float32, with the engine's bias."""
    bias = attention_bias(pad, slot, keys.shape[2])
    return ATTENTION["matmul"](q.float(), keys.float(), values.float(), bias, scaling)


@needs_triton
@pytest.mark.parametrize(("capacity", "filled", "launch"), [(128, 70, ()), (300, 263, (48, 32, 4, 3, 0)),
                                                             (300, 263, (128, 16, 2, 2, 3, False, True)),
                                                             (300, 263, (128, 32, 4, 2, 1))])
def test_fp8_keys_and_values_with_their_slot_scales_are_the_attention_of_their_values(capacity, filled, launch):
    """``k_scale``/``v_scale``: float8 keys and values, each slot's vector times its scale; the scores and the
    weighted sum are the float32 attention over those values (one split, several, parts with the last program
    merging, one part per row: the default launch where the rows fill a GPU)."""
    q, keys, values, pad = case(3, 2, 3, capacity, 24)
    (k8, ks), (v8, vs) = fp8.quantize(keys), fp8.quantize(values)
    slot = torch.tensor([filled - 1], device=DEVICE)
    expected = reference(q, fp8.dequantize(k8, ks), fp8.dequantize(v8, vs), pad, slot, 24**-0.5)
    got = decode_attention.decode_attention(q, k8, v8, pad, slot, 24**-0.5, *launch, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    exact = reference(q, keys, values, pad, slot, 24**-0.5)
    assert (got - exact).abs().max() > 1e-3  # the quantization shows: these are not the float32 keys and values
    with pytest.raises(ValueError, match="float8_e4m3fn keys and values come with their float32 scales"):
        decode_attention.decode_attention(q, k8, v8, pad, slot, 24**-0.5)
    with pytest.raises(ValueError, match="k_scale and v_scale must be float32"):
        decode_attention.decode_attention(q, k8, v8, pad, slot, 24**-0.5, k_scale=ks, v_scale=vs[:, :, :10])


@needs_triton
@pytest.mark.parametrize(
    ("rows", "kv_heads", "groups", "capacity", "dim", "filled"),
    [
        (4, 2, 1, 128, 32, 70),  # one split (the first kernel writes the output), partly filled
        # three splits (the last one short), grouped heads, a head size that is not 2^k (2 rows: in the interpreter
        # each row costs ~15 s here)
        (2, 2, 3, 300, 24, 263),
        (2, 1, 2, 384, 16, 40),  # only the first of three splits holds filled slots
        (2, 2, 1, 256, 16, 256),  # full
    ],
)
def test_equals_the_default_attention_over_the_filled_slots(rows, kv_heads, groups, capacity, dim, filled):
    q, keys, values, pad = case(rows, kv_heads, groups, capacity, dim)
    slot = torch.tensor([filled - 1], device=DEVICE)
    expected = reference(q, keys, values, pad, slot, dim**-0.5)
    out = decode_attention.decode_attention(q, keys, values, pad, slot, dim**-0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # other launch configurations give the same: split sizes (one not a multiple of the block, one covering the
    # whole cache, one of a single block), other block sizes (warps and stages: the compiled kernels only),
    # the filled slots in equal parts: one (one kernel), three, more parts than blocks (some read nothing),
    # and the loop that merges each block into one running softmax (lanes=False) at some of them
    launches = [(48, 32, 4, 3, 0), (capacity, 32, 4, 3, 0), (16, 16, 2, 1, 0), (64, 64, 8, 2, 0),
                (128, 32, 4, 1, 1), (128, 16, 2, 2, 3), (128, 16, 4, 1, 8),
                (48, 32, 4, 3, 0, False), (128, 16, 2, 2, 3, False)]
    for i, launch in enumerate(launches):
        got = decode_attention.decode_attention(q, keys, values, pad, slot, dim**-0.5, *launch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if i in (0, 5, 8):  # splits of the cache, parts of each row, with and without lanes
            # the splits merged by the last program of each (row, head) instead of a second kernel: the same merge
            # in the same order, so the same bits; every arrival counter back at zero
            last = decode_attention.Launch(*launch)._replace(last=True)
            assert torch.equal(decode_attention.decode_attention(q, keys, values, pad, slot, dim**-0.5, *last), got)
    if decode_attention._COUNTERS:
        assert not decode_attention._COUNTERS[q.device].any()
    # nothing outside pad[r] .. slot is read: garbage there changes nothing
    cols = torch.arange(capacity, device=DEVICE)
    outside = ((cols[None] < pad[:, None]) | (cols[None] > slot))[:, None, :, None]  # [R, 1, S, 1]
    garbage = torch.full_like(keys, float("nan"))
    out = decode_attention.decode_attention(
        q, torch.where(outside, garbage, keys), torch.where(outside, garbage, values), pad, slot, dim**-0.5
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: programs that run at the same time")
def test_on_a_gpu_the_last_program_merges_every_split_at_the_1b_shape_call_after_call():
    """Where programs really run concurrently, a missing order between a split's stores and the last program's
    reads would show as a wrong or varying output: the 1B shape (32 rows, 16 heads of 128, a 768-slot cache
    filled to 600, 5 splits of 128 and each row in 8 parts), 50 calls and 50 CUDA-graph replays, all equal to
    the two-kernel result."""
    q, keys, values, pad = case(32, 16, 1, 768, 128, dtype=torch.bfloat16, max_pad=40)
    slot = torch.tensor([599], device=DEVICE)
    for launch in (decode_attention.Launch(parts=0), decode_attention.Launch(parts=8)):
        want = decode_attention.decode_attention(q, keys, values, pad, slot, 128**-0.5, *launch)
        last = launch._replace(last=True)
        got = [decode_attention.decode_attention(q, keys, values, pad, slot, 128**-0.5, *last) for _ in range(50)]
        graph, outs = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            outs.append(decode_attention.decode_attention(q, keys, values, pad, slot, 128**-0.5, *last))
        replayed = []
        for _ in range(50):
            graph.replay()
            replayed.append(outs[0].clone())
        assert all(torch.equal(g, want) for g in got + replayed), launch
    assert not decode_attention._COUNTERS[q.device].any()


@needs_triton
def test_reads_a_window_view_of_a_larger_cache_and_a_strided_query():
    q, keys, values, pad = case(3, 2, 2, 256, 16)
    window, slot = 160, torch.tensor([150], device=DEVICE)
    q_strided = torch.cat([q, q], -1)[..., :16]  # last dimension contiguous, other strides not
    assert not q_strided.is_contiguous()
    out = decode_attention.decode_attention(
        q_strided, keys[:, :, :window], values[:, :, :window], pad, slot, 0.25
    )
    torch.testing.assert_close(out, reference(q, keys, values, pad, slot, 0.25), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("capacity", [100, 300])  # one split (one kernel), three splits (two kernels)
def test_bfloat16_inputs_accumulate_in_float32(capacity):
    q, keys, values, pad = case(4, 2, 2, capacity, 32, dtype=torch.bfloat16)
    slot = torch.tensor([capacity - 20], device=DEVICE)
    out = decode_attention.decode_attention(q, keys, values, pad, slot, 32**-0.5)
    assert out.dtype == torch.bfloat16
    expected = reference(q, keys, values, pad, slot, 32**-0.5)  # float32 from the same bf16 numbers
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2 ** -7)  # one bf16 rounding of the output


def test_auto_parts_run_one_program_per_row_and_head_where_they_fill_the_gpu(monkeypatch):
    """``parts=AUTO`` (the default): one split per (row, head) where rows x heads programs cover every processor,
    else splits of ``split`` slots; given parts are kept; without processors (CPU, the interpreter) it splits."""
    resolve, auto, cpu = decode_attention.resolve_parts, decode_attention.AUTO, torch.device("cpu")
    assert decode_attention.processors(cpu) == 0 and resolve(auto, 10**6, cpu) == 0
    h200 = torch.device("cuda", 0)
    monkeypatch.setattr(decode_attention, "processors", lambda device: 132)
    assert resolve(auto, 32 * 16, h200) == 1  # the 1B shape's image stage: 512 programs
    assert resolve(auto, 132, h200) == 1 and resolve(auto, 131, h200) == 0
    assert resolve(0, 512, h200) == 0 and resolve(8, 512, h200) == 8 and resolve(1, 2, h200) == 1


@needs_triton
def test_the_default_launch_is_the_one_its_rule_picks(monkeypatch):
    """The kernels that run by default are those of ``resolve_parts``'s answer (the same bits), below and at the
    GPU's processors: 2 rows x 2 heads against 5 processors (splits of 32 slots) and 4 (one program each)."""
    q, keys, values, pad = case(2, 1, 2, 96, 16)
    slot = torch.tensor([69], device=DEVICE)
    expected = reference(q, keys, values, pad, slot, 0.25)
    for processors, parts in ((5, 0), (4, 1)):
        monkeypatch.setattr(decode_attention, "processors", lambda device, n=processors: n)
        got = decode_attention.decode_attention(q, keys, values, pad, slot, 0.25, 32)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        want = decode_attention.decode_attention(q, keys, values, pad, slot, 0.25, 32, parts=parts)
        other = decode_attention.decode_attention(q, keys, values, pad, slot, 0.25, 32, parts=1 - parts)
        assert torch.equal(got, want) and not torch.equal(got, other), processors  # the two round differently


@needs_triton
@pytest.mark.parametrize(("options", "bad"), [((128, 24), "block"), ((128, 32, 3), "warps"), ((0,), "split"),
                                              ((128, 32, 4, 0), "stages"), ((128, 32, 4, 1, -2), "parts")])
def test_a_launch_configuration_out_of_range_is_named(options, bad):
    q, keys, values, pad = case(2, 1, 1, 64, 16)
    with pytest.raises(ValueError, match=f"{bad}="):
        decode_attention.decode_attention(q, keys, values, pad, torch.tensor([10], device=DEVICE), 0.25, *options)


def test_missing_triton_and_a_device_it_cannot_run_on_are_named(monkeypatch):
    monkeypatch.setattr(decode_attention, "triton", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        decode_attention.check_device(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        RolloutEngine(attention="triton")
    monkeypatch.undo()
    if decode_attention.available():
        monkeypatch.setattr(decode_attention, "interpreted", lambda: False)
        with pytest.raises(RuntimeError, match="runs on CUDA devices, not cpu"):
            decode_attention.check_device(torch.device("cpu"))


def test_a_triton_engine_uses_one_window_the_whole_cache():
    if not decode_attention.available():
        pytest.skip("needs the triton package")
    engine = RolloutEngine(attention="triton", chunk=64)
    assert engine.ladder(256, torch.device("cpu")) == [256]
    assert RolloutEngine(chunk=64).ladder(256, torch.device("cpu")) == [64, 128, 192, 256]


# the kernels compiled for GPUs here (tests/triton_aot.py)
COMPILER = PRELUDE + """
from modules import decode_attention as da

# what a launch on a GPU specializes: pointers 16-byte aligned, integers (strides, sizes) divisible by 16
ALIGNED = {"q", "keys", "values", "pad", "slot", "part_max", "part_sum", "part_acc", "out", "count", "stride_qr",
           "stride_qk", "stride_qg", "stride_kr", "stride_kh", "stride_ks", "stride_vr", "stride_vh", "stride_vs",
           "stride_or", "stride_ok", "stride_og", "dim", "split_len", "k_scale", "v_scale", "stride_sr", "stride_sh"}

def partial_types(dtype, part, cache=None):  # cache: the keys' and values' dtype (fp8e4nv: with their scales)
    tensors = dict(q=dtype, keys=cache or dtype, values=cache or dtype, out=dtype, pad="i64", slot="i64",
                   part_max=part, part_sum=part, part_acc=part, count="i32", k_scale="fp32", v_scale="fp32")
    return {name: "*" + t for name, t in tensors.items()} | dict(scaling="fp32")

def partial_constexprs(**given):  # the splits merged by _combine unless given LAST=True (and SPLITS); unscaled
    return dict(LAST=False, SPLITS=1, SCALED=False) | given
"""

COMPILE_FOR_GPUS = COMPILER + """
for arch in (80, 90):
    for dtype in ("bf16", "fp32"):
        for direct in (True, False):  # one split: the partial-result pointers are the output's (unused)
            types = partial_types(dtype, dtype if direct else "fp32")
            constexprs = partial_constexprs(BLOCK=da.BLOCK, DIM=128, DIRECT=direct, STAGES=da.STAGES, PARTS=0,
                                            LANES=True)
            compile(da._partial, types, constexprs, arch)
        # other launch configurations (benchmarks/decode_kernels.py --triton-sweep times them); stages > 1
        # pipeline the loop through shared memory (cp.async, sm_80 and later); parts > 0 splits each row's slots;
        # lanes=False merges each block into one running softmax
        for block, warps, stages, parts, lanes in ((16, 2, 1, 0, True), (64, 8, 2, 0, True), (128, 8, 3, 0, True),
                                                   (32, 4, 2, 4, True), (32, 4, 1, 0, False), (64, 8, 2, 4, False)):
            constexprs = partial_constexprs(BLOCK=block, DIM=128, DIRECT=False, STAGES=stages, PARTS=parts,
                                            LANES=lanes)
            compile(da._partial, types, constexprs, arch, num_warps=warps)
        compile(da._combine, types, dict(SPLITS=8, DIM=128), arch)
    print("compiled", arch)
"""

# RolloutEngine(kv="fp8"): float8 keys and values with their scales per slot (e4m3: compute capability 8.9 on)
FP8_LOOP = COMPILER + """
for stages, parts, lanes, last in ((1, 0, True, False), (2, 0, True, False), (1, 4, False, True)):
    constexprs = partial_constexprs(BLOCK=32, DIM=128, DIRECT=False, STAGES=stages, PARTS=parts, LANES=lanes,
                                    LAST=last, SPLITS=8 if last else 1, SCALED=True)
    ptx = compile(da._partial, partial_types("bf16", "fp32", "fp8e4nv"), constexprs, 90, ALIGNED,
                  num_warps=4).asm["ptx"]
    lines = ptx.splitlines()
    header = next(i for i, line in enumerate(lines) if "Inner Loop Header" in line)
    label = lines[header].split(":")[0]
    back = max(i for i, line in enumerate(lines) if "bra" in line and label in line)
    loop = "\\n".join(lines[header : back + 1])
    ops = re.findall(r"ld\\.global\\.[.\\w]+|cp\\.async\\.c[ag][.\\w]*|bar\\.sync", loop)
    print(f"{stages}/{parts}/{lanes}", "e4m3" if "e4m3" in loop else "no-e4m3", " ".join(ops))
try:
    compile(da._partial, partial_types("bf16", "fp32", "fp8e4nv"), constexprs, 80, ALIGNED, num_warps=4)
except Exception as error:
    print("sm_80", "fp8e4nv not supported" in str(error))
"""


def test_the_fp8_cache_kernel_compiles_for_hopper_reading_half_the_bytes():
    """32 fp8 keys x 128 dims over 128 threads: 32 bytes each, two 16-byte loads for keys and two for values where
    bf16 takes four and four (``test_the_compiled_loop_keeps_keys_and_values_in_flight``), converted from e4m3 in the
    loop; pipelined, asynchronous copies. sm_80 has no e4m3."""
    lines = dict(line.split(" ", 1) for line in compile_here(FP8_LOOP).strip().splitlines())
    for key in ("1/0/True", "1/4/False"):
        ops = lines[key].split()
        assert ops[0] == "e4m3" and ops[1:].count("ld.global.v4.b32") == 4, ops
    assert lines["2/0/True"].startswith("e4m3") and "cp.async" in lines["2/0/True"], lines
    assert lines["sm_80"] == "True"

# The loop's memory, synchronisation and shared-memory instructions in the Hopper binary's PTX, in order, from
# the loop's header to its branch back, for one and two stages, splits and parts, and both ways to accumulate.
LOOP_LOADS = COMPILER + """
for stages, parts, lanes in ((1, 0, True), (2, 0, True), (1, 4, True), (1, 0, False), (2, 0, False), (1, 4, False)):
    constexprs = partial_constexprs(BLOCK=32, DIM=128, DIRECT=False, STAGES=stages, PARTS=parts, LANES=lanes)
    ptx = compile(da._partial, partial_types("bf16", "fp32"), constexprs, 90, ALIGNED, num_warps=4).asm["ptx"]
    lines = ptx.splitlines()
    header = next(i for i, line in enumerate(lines) if "Inner Loop Header" in line)  # LLVM's comment on the label
    label = lines[header].split(":")[0]
    back = max(i for i, line in enumerate(lines) if "bra" in line and label in line)
    loop = "\\n".join(lines[header : back + 1])
    ops = re.findall(r"ld\\.global\\.[.\\w]+|cp\\.async\\.c[ag][.\\w]*|bar\\.sync|[ls]t\\.shared", loop)
    print(f"{stages}/{parts}/{'lanes' if lanes else 'merge'}", " ".join(ops))
"""


def test_the_kernels_compile_for_ampere_and_hopper_gpus_here():
    """The kernels go through Triton's real compiler down to GPU binaries (sm_80, sm_90), which the interpreter does
    not: a kernel the interpreter runs but the compiler rejects fails here, without a GPU."""
    assert compile_here(COMPILE_FOR_GPUS).split() == ["compiled", "80", "compiled", "90"]


def test_the_compiled_loop_keeps_keys_and_values_in_flight():
    """What makes the kernel fast or slow shows in its PTX, without a GPU. With one stage, each block's keys and
    values are loaded 16 bytes per instruction, all before the loop's first barrier (the value loads once waited
    behind the score's reductions: two round trips to memory per block instead of one). With two, the loop is
    pipelined: the loads become asynchronous copies into shared memory."""
    lines = dict(line.split(" ", 1) for line in compile_here(LOOP_LOADS).strip().splitlines())
    for stages_parts in ("1/0", "1/4"):  # splits of the cache, and each row in 4 parts
        for lanes in ("lanes", "merge"):
            one = lines[f"{stages_parts}/{lanes}"].split()
            # 32 keys x 128 dims of bf16 over 128 threads: 64 bytes each, so 4 loads of 16 bytes for keys, 4 for values
            before_barrier = one[: one.index("bar.sync")] if "bar.sync" in one else one
            assert before_barrier.count("ld.global.v4.b32") == 8, one
            assert "ld.global.b16" not in one  # no 2-byte loads
            assert not any(op.startswith("cp.async") for op in one)
    for lanes in ("lanes", "merge"):
        two = lines[f"2/0/{lanes}"].split()
        assert sum(op.startswith("cp.async.cg") or op.startswith("cp.async.ca") for op in two) >= 8, two


def test_the_loop_with_a_softmax_per_position_has_no_barrier():
    """``lanes`` (the default): a block's scores are reduced inside each warp only and its positions merged after the
    loop, so the loop body has no barrier and no shared memory; merging each block into one running softmax
    reduces across warps at every iteration (9 barriers with Triton 3.6, 12 with 3.9). Pipelined, the loop
    synchronises only its copies."""
    lines = dict(line.split(" ", 1) for line in compile_here(LOOP_LOADS).strip().splitlines())
    for stages_parts in ("1/0", "1/4"):
        lanes, merge = lines[f"{stages_parts}/lanes"].split(), lines[f"{stages_parts}/merge"].split()
        assert "bar.sync" not in lanes and "st.shared" not in lanes and "ld.shared" not in lanes, lanes
        assert merge.count("bar.sync") >= 6 and "st.shared" in merge, merge
    pipelined, merged = lines["2/0/lanes"].split(), lines["2/0/merge"].split()
    assert pipelined.count("bar.sync") <= 2 < merged.count("bar.sync"), (pipelined, merged)


LAST_ORDER = COMPILER + """
for arch in (80, 90):
    for parts, lanes in ((0, True), (4, False)):
        constexprs = partial_constexprs(BLOCK=32, DIM=128, DIRECT=False, STAGES=1, PARTS=parts, LANES=lanes, LAST=True,
                                        SPLITS=8)
        ptx = compile(da._partial, partial_types("bf16", "fp32"), constexprs, arch, ALIGNED, num_warps=4).asm["ptx"]
        ops = re.findall(r"bar\\.sync|atom\\.global\\.[.\\w]+|ld\\.global\\.cg[.\\w]*|st\\.global[.\\w]*", ptx)
        arrive = max(i for i, op in enumerate(ops) if op.startswith("atom.global.gpu.acq_rel"))
        start = max(i for i in range(arrive) if ops[i].startswith("st.global"))  # the split's last store
        tail = [op for i, op in enumerate(ops[start:]) if i == 0 or op != ops[start + i - 1]]
        print(arch, parts, lanes, ",".join(tail))
"""


def test_the_last_program_merges_only_after_every_split_is_stored():
    """``last``: after a split's stores, a barrier, the arrival (one thread, acquire-release at GPU scope), a barrier
    that shares its count, then the other splits' results read through L2, the merge, the output, and the counter
    zeroed. (The interpreter runs one program at a time: the GPU tests check the order between programs.)"""
    for line in compile_here(LAST_ORDER).strip().splitlines():
        order = line.split()[-1].split(",")
        assert order[:4] == ["st.global.b32", "bar.sync", "atom.global.gpu.acq_rel.add.u32", "bar.sync"], line
        loads = [op for op in order[4:] if op.startswith("ld.global")]
        assert loads and all(op.startswith("ld.global.cg") for op in loads), line
        assert order[-1] == "atom.global.gpu.relaxed.exch.b32" and order[-2].startswith("st.global"), line


def test_a_launch_configuration_is_named_and_parsed_back():
    Launch = decode_attention.Launch
    assert Launch().name == f"triton_a{decode_attention.SPLIT}_b{decode_attention.BLOCK}_w{decode_attention.WARPS}" \
        f"_p{decode_attention.STAGES}" and Launch().parts == decode_attention.AUTO
    for launch in (Launch(64, 64, 8, 2), Launch(64, 64, 8, 2, 0), Launch(block=16, warps=2, stages=3, parts=4),
                   Launch(lanes=False), Launch(parts=2, lanes=False), Launch(last=True),
                   Launch(parts=2, lanes=False, last=True), Launch(parts=0, last=True)):
        assert Launch.parse(launch.name) == launch
    assert Launch(parts=4).name.startswith("triton_n4_") and Launch(split=64, parts=0).name.startswith("triton_s64_")
    assert Launch(lanes=False).name == Launch().name + "_m" and Launch().lanes
    assert Launch(lanes=False, last=True).name == Launch().name + "_m_l" and not Launch().last
    for wrong, message in (("triton_n0_b32_w4_p1", "parts must be >= 1"), ("triton_s64_b32_w3_p1", "warps=3"),
                           ("triton_x64_b32_w4_p1", "is named triton_s<split>")):
        with pytest.raises(ValueError, match=message):
            Launch.parse(wrong)
