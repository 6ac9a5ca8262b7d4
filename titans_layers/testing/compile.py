"""Compile Triton kernels for a GPU without one: catches kernels that only the interpreter accepts,
and tiles that would not fit the GPU's shared memory, reads each kernel's registers and register
spills from the assembler (``ptxas -v``) and counts what its loops execute from the SASS
(:func:`sass_profile`), all without a GPU."""

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


# SASS opcodes counted by :func:`sass_profile`, and the bytes each width suffix moves per thread
_MEMORY_OPS = {"spill": ("LDL", "STL"), "global": ("LDG", "STG")}
_WIDTH_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
_SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _instruction_counts(instructions: list[str]) -> dict[str, int]:
    """Per-thread counts over a run of SASS instructions: all of them, MMAs, shared-memory accesses
    and barriers, and the bytes of local (spill) and global memory moved."""
    counts = {"instructions": len(instructions), "mma": 0, "shared_ops": 0, "barriers": 0, "spill_bytes": 0,
              "global_bytes": 0}
    for text in instructions:
        opcode = text.split()[0] if not text.startswith("@") else text.split()[1]
        base, *suffixes = opcode.split(".")
        counts["mma"] += "MMA" in base
        counts["shared_ops"] += base in ("LDS", "STS", "LDSM")
        counts["barriers"] += base == "BAR"
        for kind, ops in _MEMORY_OPS.items():
            if base in ops:
                counts[f"{kind}_bytes"] += next((_WIDTH_BYTES[x] for x in suffixes if x in _WIDTH_BYTES), 4)
    return counts


def sass_profile(compiled, tile_tokens: int | None = None, inner_trips: int | None = None) -> dict:
    """What a kernel compiled by :func:`compile_for_gpu` executes, counted from its SASS
    (``cuobjdump -sass``), per thread.

    A loop is a backward branch. Returns ``{"loops": [...], ...}`` with each loop's
    :func:`_instruction_counts` (outermost first), and when ``tile_tokens`` is given, ``"per_token"``:
    the counts of one pass of the outermost loop, with every loop nested in it taken
    ``inner_trips`` times, divided by ``tile_tokens`` (the tokens one outer iteration covers). For
    the chunk kernels that is a tile of BT tokens whose Dh loops run ``ceil(Dh / BH)`` times, so
    the figures are what a kernel executes per token and thread: static, but in loop
    proportion, unlike ``ptxas -v``'s spill counts (per instruction, wherever it sits). Raises
    when the loops are not one outer loop with loops one level inside it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    lines = [m.groups() for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    index = {int(address, 16): i for i, (address, _) in enumerate(lines)}
    loops = set()
    for i, (address, text) in enumerate(lines):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < int(address, 16) and int(target.group(1), 16) in index:
            loops.add((index[int(target.group(1), 16)], i))
    loops = sorted(loops, key=lambda span: span[0] - span[1])  # outermost (longest) first
    texts = [text for _, text in lines]
    profile = {"loops": [dict(first=a, last=b, **_instruction_counts(texts[a:b + 1])) for a, b in loops]}
    if tile_tokens is None:
        return profile
    if not loops:
        raise AssertionError(f"{compiled.metadata.name}: no loop in the SASS to count per token")
    (a, b), inner = loops[0], loops[1:]
    nested = lambda x, y: y[0] <= x[0] and x[1] <= y[1]
    if not all(nested(x, (a, b)) for x in inner) or any(nested(x, y) for x in inner for y in inner if x != y):
        raise AssertionError(f"{compiled.metadata.name}: loops {loops} are not one outer loop with loops one level "
                             "inside it")
    outer, per_inner = profile["loops"][0], profile["loops"][1:]
    profile["per_token"] = {key: (outer[key] + (inner_trips - 1) * sum(c[key] for c in per_inner)) / tile_tokens
                            for key in _instruction_counts([])}
    return profile


def compile_in_subprocess(kernel: str, *, capability: int, pointers: dict[str, str], scalars: dict[str, str],
                          constexprs: dict, num_warps: int = 4, num_stages: int = 1, sass: dict | None = None) -> dict:
    """:func:`compile_for_gpu` in a fresh Python with ``TRITON_INTERPRET=0``, so it works while
    this process runs Triton's interpreter. ``kernel``: "package.module:kernel_name".
    Returns ``{"shared": bytes, "capability": ...}`` and :func:`register_usage`'s figures, and with
    ``sass`` (:func:`sass_profile`'s keyword arguments) its profile under ``"sass"``; raises
    AssertionError with the child's error."""
    spec = dict(kernel=kernel, capability=capability, pointers=pointers, scalars=scalars, constexprs=constexprs,
                num_warps=num_warps, num_stages=num_stages, sass=sass)
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "titans_layers.testing.compile", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{kernel} did not compile for sm_{capability}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    module, name = spec.pop("kernel").split(":")
    sass = spec.pop("sass")
    kernel = getattr(importlib.import_module(module), name)
    compiled = compile_for_gpu(kernel, **spec)
    extra = {} if sass is None else {"sass": sass_profile(compiled, **sass)}
    print(json.dumps({"shared": compiled.metadata.shared, "capability": spec["capability"],
                      **register_usage(compiled, spec["capability"]), **extra}))


if __name__ == "__main__":
    _main(sys.argv[1])
