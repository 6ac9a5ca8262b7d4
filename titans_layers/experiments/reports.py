"""The report of an experiment in its output folder: ``results.json`` (everything), ``report.md``
(tables) and the PNG plots (:mod:`titans_layers.experiments.plots`).

``results.json``: ``task``, ``task_options``, ``command``, ``versions``, ``device``, ``wall_s``,
``interrupted``, ``skipped`` (models not run here, with the reason), ``notes``, and ``runs``: per
run ``model``, ``params``, ``param_ratio`` (to the reference model of its grid point),
``hidden_size``, ``config`` (the ``TitansConfig`` fields that differ from its defaults),
``overrides`` (its ``--set`` grid point), ``train_config``, ``training`` (steps, wall time,
tokens/s, interrupted, early stop), ``curve``, ``metrics`` and, for memory models, ``gates``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

PARAM_TOLERANCE = 0.10


def versions() -> dict:
    """Versions of what the numbers depend on."""
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
           "platform": platform.platform()}
    for mod in ("titans_layers", "fla", "transformers", "triton"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "unknown")
        except Exception:  # an optional package absent or broken: the report says so
            out[mod] = "not installed"
    return out


def device_name(device: str) -> str:
    """A readable name of ``device`` (the GPU's name, or the CPU's and its thread count)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, torch threads per run as set)"


def headline(run: dict, task: str) -> float | None:
    """The one number of a run: MQAR accuracy, NIAH accuracy at the training length, LM bits per byte."""
    m = run.get("metrics") or {}
    if task == "mqar":
        return m.get("accuracy")
    if task == "niah":
        return m.get("accuracy_train_length")
    return m.get("bits_per_byte")


def _fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _label(run: dict) -> str:
    return run["model"] + "".join(f" {k}={v}" for k, v in (run.get("overrides") or {}).items())


def results_table(results: dict) -> str:
    """The headline Markdown table: one row per run."""
    task = results["task"]
    runs = results["runs"]
    metric = {"mqar": "accuracy", "niah": "accuracy (train length)", "lm": "bits/byte"}[task]
    head = ["model", "params", "width", metric]
    dist_bins, loads = [], []
    if task == "mqar":
        for r in runs:
            for b in (r.get("metrics") or {}).get("accuracy_by_distance", {}):
                if b not in dist_bins:
                    dist_bins.append(b)
            for n in (r.get("metrics") or {}).get("accuracy_by_load", {}):
                if n not in loads:
                    loads.append(n)
        loads.sort(key=int)
        head += [f"dist {b}" for b in dist_bins] + [f"{n} pairs" for n in loads]
    head += ["steps", "train s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        m = r.get("metrics") or {}
        params = r.get("params")
        ratio = r.get("param_ratio")
        p = "–" if params is None else f"{params / 1000:.1f}K" + (
            "" if ratio is None or abs(ratio - 1) <= PARAM_TOLERANCE else f" ({ratio:.2f}x!)")
        row = [_label(r), p, _fmt(r.get("hidden_size")), _fmt(headline(r, task))]
        if task == "mqar":
            row += [_fmt((m.get("accuracy_by_distance", {}).get(b) or {}).get("accuracy")) for b in dist_bins]
            row += [_fmt(m.get("accuracy_by_load", {}).get(n)) for n in loads]
        tr = r.get("training") or {}
        row += [_fmt(tr.get("steps")), _fmt(tr.get("wall_s"), 0), r.get("status", "")]
        lines.append("| " + " | ".join(row) + " |")
    for s in results.get("skipped", []):
        lines.append("| " + " | ".join([s["model"], "–", "–", "skipped"] + ["–"] * (len(head) - 5)
                                       + [s["reason"]]) + " |")
    return "\n".join(lines)


def niah_tables(results: dict) -> str:
    """Per run, accuracy by length (rows) and needle depth (columns)."""
    out = []
    for r in results["runs"]:
        acc = (r.get("metrics") or {}).get("accuracy")
        if not isinstance(acc, dict) or not acc:
            continue
        depths = list(next(iter(acc.values())).keys())
        out.append(f"**{_label(r)}** (all digits right)\n")
        out.append("| length | " + " | ".join(f"depth {d}" for d in depths) + " |")
        out.append("|---|" + "---|" * len(depths))
        for length, row in acc.items():
            out.append(f"| {length} | " + " | ".join(_fmt(row.get(d)) for d in depths) + " |")
        for length, err in ((r.get("metrics") or {}).get("errors") or {}).items():
            out.append(f"| {length} | not evaluated: {err} |" + " |" * (len(depths) - 1))
        out.append("")
    return "\n".join(out)


def gate_table(results: dict) -> str:
    """Mean theta by token role and the gates' medians, per memory layer of every run."""
    lines = ["| run | layer | alpha p50 | eta p50 | theta p50 | theta key | theta value | theta query | "
             "theta filler | memory norm (end) |", "|" + "---|" * 10]
    any_rows = False
    for r in results["runs"]:
        for g in r.get("gates") or []:
            any_rows = True
            roles = g["theta"]["mean_by_role"]
            lines.append("| " + " | ".join([
                _label(r), g["layer"].replace("model.layers.", "L").replace(".mixer.memory", ""),
                _fmt(g["alpha"]["quantiles"]["p50"], 4), _fmt(g["eta"]["quantiles"]["p50"]),
                _fmt(g["theta"]["quantiles"]["p50"], 4), _fmt(roles.get("key"), 4), _fmt(roles.get("value"), 4),
                _fmt(roles.get("query"), 4), _fmt(roles.get("filler"), 4), _fmt(g["norm"][-1] if g["norm"] else None)])
                + " |")
    return "\n".join(lines) if any_rows else ""


def write_report(results: dict, out: Path, plots: list[str]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.md`` into ``out`` -> their paths."""
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "results.json", out / "report.md"
    jpath.write_text(json.dumps(results, indent=1, default=float))
    md = [f"# {results['task']} experiment", "",
          f"Command: `{results['command']}`  ", f"Device: {results['device']}; wall time {results['wall_s']:.0f} s"
          + (f", CPU time {results['cpu_s']:.0f} s over {results.get('jobs', 1)} parallel run(s)"
             if results.get("cpu_s") else "")
          + ("; **interrupted (partial report)**" if results.get("interrupted") else ""), "",
          "Task: " + ", ".join(f"{k}={v}" for k, v in results["task_options"].items()), "",
          "Training: " + ", ".join(f"{k}={v}" for k, v in results["train_options"].items()), "",
          "## Results", "", results_table(results), ""]
    md += [f"- {n}" for n in results.get("notes", [])] + [""]
    if results["task"] == "niah":
        md += ["## Accuracy by length and depth", "", niah_tables(results), ""]
    gt = gate_table(results)
    if gt:
        md += ["## Memory gates (after training, one evaluation batch)", "",
               "theta by role: mean step size at that kind of token; a memory that stores what matters "
               "writes harder at keys and values than at filler.", "", gt, ""]
    failed = [r for r in results["runs"] if str(r.get("status", "")).startswith("failed")]
    for r in failed:
        md += [f"Run {_label(r)} failed: `{r['status']}`", ""]
    if plots:
        md += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    md += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    mpath.write_text("\n".join(md))
    return jpath, mpath
