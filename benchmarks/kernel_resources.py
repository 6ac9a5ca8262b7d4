"""Shared memory, registers and register spills of every Triton kernel, as compiled for sm_80 and sm_90
at the launch settings it gets on each (``titans_layers/testing/kernel_builds.py``), and what the
chunk kernels execute per token, with no GPU needed.

Each build is compiled in a fresh process (``TRITON_INTERPRET=0``) and its PTX re-assembled with
Triton's own ``ptxas -v`` (``titans_layers.testing.compile.register_usage``). Spill bytes are per
thread and per instruction (static, as ptxas counts them): a spill inside a loop costs that many
bytes of local-memory traffic per thread per iteration. A kernel that uses 255 registers and
spills asks for more registers than a thread has; far fewer registers together with large
spills is ptxas giving up on allocation (seen on sm_80).

Per token (the MLP chunk kernels; ``titans_layers.testing.compile.sass_profile``): counted from
the SASS, each tile loop's body with its Dh loops taken ``ceil(Dh / BH)`` times, divided by the
tile's BT tokens, and summed over the block's threads (instructions and MMAs: per warp, so
issued warp instructions): what one program executes per token of one head. Static counts (no
branch is weighed), but in loop proportion: they compare launch settings on what each issues and
moves, which the GPU timings (``benchmark_mlp_memory --launches``) then confirm or not.

Usage (from the repo root)::

    python -m benchmarks.kernel_resources                      # every kernel, sm_80 and sm_90
    python -m benchmarks.kernel_resources --match mlp --capabilities 90

Writes ``<out>/kernel_resources_<timestamp>.json`` (versions, one entry per build and capability)
and a ``.md`` with the same stem (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import triton

from titans_layers.testing.compile import compile_in_subprocess
from titans_layers.testing.kernel_builds import KernelBuild, kernel_builds

COLUMNS = ("kernel", "build", "sm", "warps", "stages", "BH", "shared KB", "registers", "spill stores B",
           "spill loads B", "stack B")
# per token and head, summed over a program's threads (blank for kernels without tiles)
TOKEN_COLUMNS = ("warp instr / token", "MMA / token", "spill KB / token", "global KB / token")


def measure(build: KernelBuild) -> dict:
    """One build's figures (a row of the report)."""
    usage = compile_in_subprocess(build.kernel, sass=build.sass_kwargs(), **build.compile_kwargs())
    row = {"kernel": build.name, "build": build.label, "sm": build.capability, "warps": build.num_warps,
           "stages": build.num_stages, "BH": build.constexprs.get("BH", "-"),
           "shared KB": round(usage["shared"] / 1024, 1), "registers": usage["registers"],
           "spill stores B": usage["spill_stores"], "spill loads B": usage["spill_loads"], "stack B": usage["stack"],
           "constexprs": build.constexprs}
    per_token = usage.get("sass", {}).get("per_token")
    threads, warps = 32 * build.num_warps, build.num_warps
    figures = (None,) * 4 if per_token is None else (
        round(per_token["instructions"] * warps), round(per_token["mma"] * warps, 1),
        round(per_token["spill_bytes"] * threads / 1024, 1), round(per_token["global_bytes"] * threads / 1024, 1))
    row.update({c: "-" if x is None else x for c, x in zip(TOKEN_COLUMNS, figures)})
    return row


def ptxas_version() -> str:
    """The version line of the ptxas that Triton bundles."""
    from triton.backends.nvidia.compiler import get_ptxas

    out = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def markdown(rows: list[dict], meta: dict) -> str:
    """The report as a Markdown table."""
    lines = ["# Triton kernel resources (compiled without a GPU)", "",
             f"- triton {meta['triton']}; ptxas: {meta['ptxas']}", f"- git commit: {meta['commit']}",
             f"- date: {meta['date']}", "",
             "Per thread: registers, and spill bytes per instruction (static counts from `ptxas -v`). Per token "
             "(chunk kernels of the MLP memory): issued warp instructions, warp MMAs and KB of local (spill) and "
             "global memory traffic of one program, counted from the SASS in loop proportion (module docstring).",
             "", "| " + " | ".join(COLUMNS + TOKEN_COLUMNS) + " |",
             "|" + " --- |" * 3 + " ---: |" * (len(COLUMNS + TOKEN_COLUMNS) - 3)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS + TOKEN_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--match", default="", help="only builds whose kernel name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and Markdown files")
    args = parser.parse_args(argv)
    capabilities = [int(c) for c in args.capabilities.split(",")]
    builds = [b for c in capabilities for b in kernel_builds(c) if args.match in b.name]
    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each job is a subprocess
        rows = list(pool.map(measure, builds))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    commit += " (with uncommitted changes)" if commit and dirty else ""
    meta = {"triton": triton.__version__, "ptxas": ptxas_version(), "commit": commit or "unknown",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - start, 1)}
    report = markdown(rows, meta)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kernel_resources_{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
