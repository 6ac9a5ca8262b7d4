"""Compile Triton kernels for a GPU without one: catches kernels that only the interpreter accepts,
and tiles that would not fit the GPU's shared memory, and reads each kernel's registers and
register spills from the assembler (``ptxas -v``), all without a GPU."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Largest shared memory one block may use (bytes), per compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def compile_for_gpu(kernel, *, capability: int, pointers: dict[str, str], scalars: dict[str, str],
                    constexprs: dict, num_warps: int = 4, num_stages: int = 1):
    """Compile ``kernel`` to a cubin for CUDA compute capability ``capability`` (80 for sm_80...).

    ``pointers``: argument name -> Triton pointer type ("*bf16", "*fp32", "*i64"); arguments not
    named there or in ``scalars``/``constexprs`` are "*fp32". ``scalars``: name -> "i32"/"i64"/"fp32".
    Raises AssertionError when the kernel needs more shared memory than the GPU has.
    """
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = scalars.get(name, pointers.get(name, "*fp32"))
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    if "cubin" not in compiled.asm:
        raise AssertionError(f"{kernel.__name__}: no cubin for sm_{capability}")
    shared = compiled.metadata.shared
    limit = SHARED_MEMORY_LIMIT[capability]
    if shared > limit:
        raise AssertionError(f"{kernel.__name__} with {constexprs} needs {shared} bytes of shared memory; "
                             f"sm_{capability} has {limit}")
    return compiled


def register_usage(compiled, capability: int) -> dict[str, int]:
    """Registers per thread and local-memory spills of a kernel compiled by :func:`compile_for_gpu`.

    Re-assembles its PTX with Triton's own ``ptxas`` and the flags Triton passes (so the figures
    are those of the cubin it built) and parses ``-v``'s report. Returns ``{"registers": per
    thread, "spill_stores": bytes, "spill_loads": bytes, "stack": bytes of stack frame}`` (spills:
    bytes per thread, counted once per instruction, as ptxas reports them).
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(capability)}", ptx, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"ptxas failed on {compiled.metadata.name}:\n{proc.stderr[-2000:]}")
    log = proc.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        if found is None:
            raise AssertionError(f"no {pattern!r} in the ptxas report:\n{log[-2000:]}")
        return int(found.group(1))

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame")}


def compile_in_subprocess(kernel: str, *, capability: int, pointers: dict[str, str], scalars: dict[str, str],
                          constexprs: dict, num_warps: int = 4, num_stages: int = 1) -> dict:
    """:func:`compile_for_gpu` in a fresh Python with ``TRITON_INTERPRET=0``, so it works while
    this process runs Triton's interpreter. ``kernel``: "package.module:kernel_name".
    Returns ``{"shared": bytes, "capability": ...}`` and :func:`register_usage`'s figures;
    raises AssertionError with the child's error."""
    spec = dict(kernel=kernel, capability=capability, pointers=pointers, scalars=scalars, constexprs=constexprs,
                num_warps=num_warps, num_stages=num_stages)
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "titans_layers.testing.compile", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{kernel} did not compile for sm_{capability}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    module, name = spec.pop("kernel").split(":")
    kernel = getattr(importlib.import_module(module), name)
    compiled = compile_for_gpu(kernel, **spec)
    print(json.dumps({"shared": compiled.metadata.shared, "capability": spec["capability"],
                      **register_usage(compiled, spec["capability"])}))


if __name__ == "__main__":
    _main(sys.argv[1])
