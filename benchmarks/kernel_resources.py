"""Shared memory, registers and register spills of every Triton kernel, as compiled for sm_80 and sm_90
at its launch settings (``titans_layers/testing/kernel_builds.py``), with no GPU needed.

Each build is compiled in a fresh process (``TRITON_INTERPRET=0``) and its PTX re-assembled with
Triton's own ``ptxas -v`` (``titans_layers.testing.compile.register_usage``). Spill bytes are per
thread and per instruction (static, as ptxas counts them): a spill inside a loop costs that many
bytes of local-memory traffic per thread per iteration. A kernel that uses 255 registers and
spills asks for more registers than a thread has; far fewer registers together with large
spills is ptxas giving up on allocation (seen on sm_80).

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

COLUMNS = ("kernel", "build", "sm", "warps", "stages", "shared KB", "registers", "spill stores B", "spill loads B",
           "stack B")


def measure(build: KernelBuild, capability: int) -> dict:
    """One build's figures for one compute capability (a row of the report)."""
    usage = compile_in_subprocess(build.kernel, capability=capability, **build.compile_kwargs())
    return {"kernel": build.name, "build": build.label, "sm": capability, "warps": build.num_warps,
            "stages": build.num_stages, "shared KB": round(usage["shared"] / 1024, 1),
            "registers": usage["registers"], "spill stores B": usage["spill_stores"],
            "spill loads B": usage["spill_loads"], "stack B": usage["stack"], "constexprs": build.constexprs}


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
             "Per thread: registers, and spill bytes per instruction (static counts from `ptxas -v`).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * 3 + " ---: |" * (len(COLUMNS) - 3)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--match", default="", help="only builds whose kernel name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and Markdown files")
    args = parser.parse_args(argv)
    capabilities = [int(c) for c in args.capabilities.split(",")]
    builds = [b for b in kernel_builds() if args.match in b.name]
    jobs = [(b, c) for b in builds for c in capabilities]
    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each job is a subprocess
        rows = list(pool.map(lambda job: measure(*job), jobs))
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
