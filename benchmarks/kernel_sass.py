"""What the decode kernels' main loops compile to: static analysis of their SASS, on CPU, no GPU needed.

Triton's CUDA backend compiles a kernel ahead of time for any ``sm_<arch>`` (it ships ptxas and cuobjdump), so the
machine code a GPU would run can be read without one. For ``modules.decode_linear._linear`` (the default launch,
32 rows; plain, the inner dimension split, and gated) and ``modules.decode_attention._partial`` (the engine's
default launch at a 7B/1B-like stage) this script compiles the bf16 and the float8 variants, finds the main loop in
the SASS (the longest body a backward branch closes: one iteration, Triton pipelines without unrolling) and counts
its instructions by opcode and by class (:data:`CLASSES`). The counts are one thread's (each warp issues them
once); ``bytes_per_iteration`` is what the whole program reads of the weights (or keys and values) per iteration,
and ``instructions_per_kib`` the one over the other; ``warp_instructions_per_kib`` counts every warp's (what an
SM's schedulers issue for a KiB: an SM that issues 4 a clock and reads 16 bytes a clock, about an H200's share of
its bandwidth at 132 SMs, keeps up with memory below 256). Registers and spills come from ``ptxas -v``.

These are instruction counts, not time: a loop can issue more instructions and still wait on memory. What they
show is which pipes a loop leans on. Widening the fp8 weights with Triton's conversion (``_c`` launches, CAST)
takes conversion instructions (F2FP and F2F: a pipe with a fraction of the integer pipe's rate, per the CUDA
programming guide's throughput table) for every weight; widening them by
their bits (``_widen``, the default) replaces them with integer and packed-bf16 (fp16x2) ones. The table says
whether the compiled loop really has no conversion left, and what it costs instead.

    python benchmarks/kernel_sass.py                                   # linear and attention, sm_90
    python benchmarks/kernel_sass.py --kernels linear --keep /tmp/sass # and each kernel's .ptx and .sass there

One JSON line per kernel (``measure: kernel_sass``). Exit code 2 where Triton's CUDA backend is missing.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]

# SASS opcode classes, by the opcode's name before its first dot (HADD2.F32 -> HADD2). Uniform-datapath versions
# of the integer opcodes (UIADD3, UMOV, ...) count as integer; anything unnamed is "other" (MUFU, STS, branches...).
CLASSES = {
    "HMMA": ("HMMA", "HGMMA"),  # tensor-core matrix multiply-accumulate (warp-level mma; warpgroup wgmma)
    # the conversion pipe (a fraction of the integer pipe's rate: the CUDA guide's throughput table). HADD2.F32 is
    # not one of them: ptxas widens f16 to f32 as a packed half add into float32, an instruction of the fp16x2
    # (FMA) pipe at that pipe's rate, so it counts under fp16x2 by its name
    "conversion": ("F2F", "F2FP", "I2F", "F2I", "I2I", "I2FP", "F2IP", "FRND"),
    "fp16x2": ("HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2", "HSET2"),  # packed f16/bf16 pairs (HFMA2.BF16_V2)
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "FSEL", "FCHK"),
    # integer ALU: arithmetic, logic, shifts, byte permutes, compares, selects, moves
    "integer": ("IMAD", "IADD3", "VIADD", "LEA", "LOP3", "SHF", "PRMT", "ISETP", "IMNMX", "VIMNMX", "SEL", "MOV",
                "IABS", "POPC", "FLO", "BMSK", "SGXT", "PLOP3", "P2R", "R2P"),
    "shared_load": ("LDS", "LDSM"),
    "global": ("LDG", "STG", "LDGSTS", "RED", "ATOMG", "UTMALDG", "UBLKCP"),  # incl. cp.async and TMA copies
    "barrier": ("BAR", "DEPBAR", "LDGDEPBAR", "MEMBAR", "SYNCS", "WARPSYNC", "WARPGROUP"),
}
CLASS_OF = {name: kind for kind, names in CLASSES.items() for name in names}
_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][\w.]*)([^;]*);")
_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_TARGET = re.compile(r"(?:0x([0-9a-f]+)|`\((\.L_x_\d+)\))\s*$")  # cuobjdump's address, nvdisasm's label


class Instruction(NamedTuple):
    address: int
    opcode: str  # with its modifiers: LDGSTS.E.BYPASS.128
    target: int | None = None  # a branch's (BRA) destination


class Kernel(NamedTuple):
    """One compiled variant: ``fn`` a ``@triton.jit`` kernel, ``types`` its pointer and float arguments' Triton types
    (other arguments i32, or constexprs), ``aligned`` the arguments a GPU launch specializes (16-byte aligned
    pointers, integers divisible by 16) at real shapes, ``streamed`` the bytes of weights (or cache) one program
    reads per loop iteration."""

    kernel: str
    variant: str
    fn: object
    types: dict
    constexprs: dict
    aligned: frozenset
    warps: int
    streamed: int


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of one function in ``cuobjdump -sass`` or ``nvdisasm`` output, branch targets as
    addresses (nvdisasm's ``.L_x_<n>`` labels: the address of the instruction after the label)."""
    found, labels, pending = [], {}, []
    for line in text.splitlines():
        if label := _LABEL.match(line):
            pending.append(label.group(1))
        elif match := _INSTRUCTION.match(line):
            address = int(match.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            found.append((address, match.group(2), match.group(3).strip()))
    instructions = []
    for address, opcode, operands in found:
        target = _TARGET.search(operands) if opcode.split(".")[0] == "BRA" else None
        if target:
            target = int(target.group(1), 16) if target.group(1) else labels.get(target.group(2))
        instructions.append(Instruction(address, opcode, target))
    return instructions


def main_loop(instructions: list[Instruction]) -> list[Instruction]:
    """The body of the main loop: the instructions from a backward branch's target to the branch, the longest of
    them (a pipelined loop's body is one iteration: Triton software-pipelines without unrolling)."""
    loops = [(op.target, op.address) for op in instructions if op.target is not None and op.target <= op.address]
    if not loops:
        raise ValueError("no backward branch in the SASS: no loop")
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return [op for op in instructions if start <= op.address <= end]


def classify(opcode: str) -> str:
    """The class (a key of :data:`CLASSES`, or ``other``) of a SASS opcode."""
    name = opcode.split(".")[0]
    if name not in CLASS_OF and name.startswith("U") and CLASS_OF.get(name[1:]) == "integer":
        name = name[1:]  # the uniform datapath's integer ops
    return CLASS_OF.get(name, "other")


def loop_counts(body: list[Instruction]) -> dict:
    """The loop's instruction count, per class (every class, 0 where none) and per opcode (most frequent first)."""
    classes = collections.Counter(classify(op.opcode) for op in body)
    return dict(loop_instructions=len(body), loop_classes={kind: classes[kind] for kind in [*CLASSES, "other"]},
                loop_ops=dict(collections.Counter(op.opcode for op in body).most_common()))


def linear_kernels() -> list[Kernel]:
    """``_linear`` at the default launch, 32 rows: plain (split inner dimension, 4 splits: the float32 sums stored)
    and gated (one split, the activation in the kernel), each with bf16 weights, fp8 weights widened by their bits
    and fp8 weights widened by Triton's conversion; then bf16 and bits again in 64-row programs (``_m64``, launch
    ``block_m=64``: on sm_90 the warpgroup wgmma, ``HGMMA``)."""
    import triton.language as tl

    from modules import decode_linear

    launch = decode_linear.LinearLaunch()
    aligned = frozenset({"x", "w", "residual", "out", "part", "count", "scale", "inner", "k_len", "stride_xm",
                         "stride_wn", "stride_rm", "stride_om"})  # rows_n and cols_n vary with the call
    kernels = []
    for layout, split in (("plain", 4), ("gated", 1)):
        for weight, element, cast, rows in (("bf16", "bf16", False, 32), ("fp8_bits", "fp8e4nv", False, 32),
                                            ("fp8_cast", "fp8e4nv", True, 32), ("bf16_m64", "bf16", False, 64),
                                            ("fp8_bits_m64", "fp8e4nv", False, 64)):
            types = dict(x="*bf16", w="*" + element, residual="*bf16", out="*bf16", part="*fp32", count="*i32",
                         scale="*fp32")
            constexprs = dict(BLOCK_M=rows, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, STAGES=launch.stages,
                              SPLIT=split, GATED=layout == "gated", RESIDUAL=False, IEEE=False, UPCAST=False,
                              LAST=False, WEIGHT=tl.bfloat16, SCALED=element != "bf16", CAST=cast)
            streamed = launch.block_n * launch.block_k * (2 if element == "bf16" else 1) * (2 if split == 1 else 1)
            kernels.append(Kernel("linear", f"{layout}_{weight}", decode_linear._linear, types, constexprs, aligned,
                                  launch.warps, streamed))
    return kernels


def attention_kernels() -> list[Kernel]:
    """``_partial`` at the engine's default launch for a 7B/1B-like stage (head dimension 128): one program per
    (row, head) over all its filled slots (``resolve_parts(AUTO, ...)`` is 1 where rows x heads fill the GPU, 32
    rows x 16 heads on an H200's 132 processors; no second kernel), with a bf16 and an fp8 cache."""
    from modules import decode_attention

    launch, dim = decode_attention.Launch(), 128
    aligned = frozenset({"q", "keys", "values", "pad", "slot", "part_max", "part_sum", "part_acc", "out", "count",
                         "k_scale", "v_scale", "dim", "split_len"}
                        | {name for name in inspect.signature(decode_attention._partial.fn).parameters
                           if name.startswith("stride_")})
    kernels = []
    for cache, scaled in (("bf16", False), ("fp8", True)):
        element = "fp8e4nv" if scaled else "bf16"
        types = dict(q="*bf16", keys="*" + element, values="*" + element, pad="*i64", slot="*i64", part_max="*bf16",
                     part_sum="*bf16", part_acc="*bf16", out="*bf16", count="*i32", k_scale="*fp32",
                     v_scale="*fp32", scaling="fp32")  # direct: the partial results' pointers are out's (unused)
        constexprs = dict(BLOCK=launch.block, DIM=dim, DIRECT=True, STAGES=launch.stages, PARTS=1,
                          LANES=launch.lanes, LAST=False, SPLITS=1, SCALED=scaled)
        streamed = 2 * launch.block * dim * (1 if scaled else 2)  # keys and values (not the fp8 scales)
        kernels.append(Kernel("attention", cache, decode_attention._partial, types, constexprs, aligned,
                              launch.warps, streamed))
    return kernels


def compiled(kernel: Kernel, arch: int):
    """``kernel`` compiled by Triton for ``sm_<arch>`` (as in tests/triton_aot.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn.fn).parameters)
    signature = {n: kernel.types.get(n, "constexpr" if n in kernel.constexprs else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in kernel.aligned}
    source = ASTSource(fn=kernel.fn, signature=signature, constexprs=kernel.constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=kernel.warps))


def resources(ptx: str, arch: int) -> tuple[int, int]:
    """Registers per thread and spilled bytes (stores + loads) from ``ptxas -v``: the ptxas Triton compiles with
    for ``arch`` (ptxas-blackwell from sm_90: the plain one is too old for Triton 3.9's PTX), Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "kernel.ptx")
        source.write_text(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(source), "-o",
                               str(Path(folder, "kernel.cubin"))], capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def disassembled(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (Triton's own cuobjdump)."""
    import triton

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "kernel.cubin")
        path.write_bytes(cubin)
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout


def measure(kernel: Kernel, arch: int, keep: Path | None) -> dict:
    """The JSON record of one compiled kernel (and its .ptx and .sass in ``keep``)."""
    binary = compiled(kernel, arch)
    ptx, sass = binary.asm["ptx"], disassembled(binary.asm["cubin"])
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{kernel.kernel}_{kernel.variant}_sm{arch}.ptx").write_text(ptx)
        (keep / f"{kernel.kernel}_{kernel.variant}_sm{arch}.sass").write_text(sass)
    registers, spills = resources(ptx, arch)
    counts = loop_counts(main_loop(parse_sass(sass)))
    return dict(measure="kernel_sass", kernel=kernel.kernel, variant=kernel.variant, arch=arch, registers=registers,
                spills=spills, **counts, bytes_per_iteration=kernel.streamed,
                instructions_per_kib=round(counts["loop_instructions"] * 1024 / kernel.streamed, 2),
                warp_instructions_per_kib=round(counts["loop_instructions"] * kernel.warps * 1024 / kernel.streamed,
                                                1))


KERNELS = {"linear": linear_kernels, "attention": attention_kernels}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: sm_90a)")
    parser.add_argument("--kernels", default="linear,attention", help="comma-separated: linear, attention")
    parser.add_argument("--keep", type=Path, help="a folder for each kernel's .ptx and .sass")
    args = parser.parse_args(argv)
    args.kernels = args.kernels.split(",")
    if unknown := set(args.kernels) - set(KERNELS):
        parser.error(f"--kernels takes {', '.join(KERNELS)}, got {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    args = parse_args()
    # compiled, not interpreted: Triton reads this when its jit decorates the kernels (at their modules' import)
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        import triton.backends
    except ImportError:
        triton = None
    if triton is None or "nvidia" not in triton.backends.backends:
        print("kernel_sass: needs the triton package with its CUDA backend (compiler, ptxas, cuobjdump)",
              file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, str(ROOT))  # this checkout's kernels
    for name in args.kernels:
        for kernel in KERNELS[name]():
            print(json.dumps(measure(kernel, args.arch, args.keep)), flush=True)


if __name__ == "__main__":
    main()
