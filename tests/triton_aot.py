"""Triton's own compiler, CUDA backend, ahead of time: no GPU needed (ptxas ships with Triton). Scripts run in a
fresh process because under TRITON_INTERPRET=1 (the tests on CPU) Triton's functions are the interpreter's.

``PRELUDE`` starts such a script: ``compile(kernel, types, constexprs, arch, aligned=(), **options)`` compiles a
``@triton.jit`` kernel for ``sm_<arch>``. ``types`` maps the pointer and float arguments to Triton's type names
(``"*bf16"``, ``"fp32"``; other arguments are ``i32``, or constexprs where ``constexprs`` names them); ``aligned``
names the arguments a GPU launch would specialize (pointers 16-byte aligned, integers divisible by 16), so the
code is the code the GPU runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PRELUDE = """
import collections, inspect, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile(kernel, types, constexprs, arch, aligned=(), **options):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: types.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
"""


def compile_here(script: str) -> str:
    """``script``'s output, run with Triton compiling for GPUs (not interpreting); skips without its CUDA backend."""
    pytest.importorskip("triton")
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's CUDA backend is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout
