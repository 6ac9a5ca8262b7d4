"""PNG plots of an experiment (matplotlib, Agg backend): accuracy by distance and by load (MQAR),
accuracy by length and depth (NIAH), loss by position (LM), training curves, the memory layers'
gate statistics (one figure per run), and the swept option's effect when ``--set`` sweeps."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from titans_layers.experiments.reports import headline  # noqa: E402


def _label(run: dict) -> str:
    return run["model"] + "".join(f" {k}={v}" for k, v in (run.get("overrides") or {}).items())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_mqar(results: dict, out: Path) -> list[str]:
    runs = [r for r in results["runs"] if r.get("metrics")]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        bins = r["metrics"].get("accuracy_by_distance", {})
        if bins:
            xs = [int(b.split("-")[0]) for b in bins]
            ax.plot(xs, [v["accuracy"] for v in bins.values()], marker="o", label=_label(r))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("key-to-query distance (tokens, bin start)")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    window = results.get("window_size")
    if window:
        ax.axvline(window, color="grey", ls="--", lw=1, label=f"attention window {window}")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("MQAR: recall by distance")
    paths.append(_save(fig, out / "mqar_accuracy_by_distance.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        loads = r["metrics"].get("accuracy_by_load", {})
        if loads:
            ax.plot([int(k) for k in loads], list(loads.values()), marker="o", label=_label(r))
    ax.set_xlabel("key-value pairs in the context")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("MQAR: recall by load")
    paths.append(_save(fig, out / "mqar_accuracy_by_load.png"))
    return paths


def plot_niah(results: dict, out: Path) -> list[str]:
    runs = [r for r in results["runs"] if isinstance((r.get("metrics") or {}).get("accuracy"), dict)]
    if not runs:
        return []
    n = len(runs)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        acc = r["metrics"]["accuracy"]
        lengths, depths = list(acc), list(next(iter(acc.values())))
        grid = np.array([[acc[L][d] for d in depths] for L in lengths])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length")
        ax.set_title(_label(r), fontsize=8)
        for i in range(len(lengths)):
            for j in range(len(depths)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    return [_save(fig, out / "niah_accuracy.png")]


def plot_lm(results: dict, out: Path) -> list[str]:
    runs = [r for r in results["runs"] if (r.get("metrics") or {}).get("loss_by_position")]
    if not runs:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        lp = r["metrics"]["loss_by_position"]
        ax.plot([int(k) for k in lp], [v / np.log(2) for v in lp.values()], marker="o", label=_label(r))
    ax.set_xlabel("position in the context (bin start)")
    ax.set_ylabel("held-out bits per byte")
    ax.legend(fontsize=7)
    ax.set_title("Byte LM: loss by position")
    return [_save(fig, out / "lm_loss_by_position.png")]


def plot_curves(results: dict, out: Path) -> list[str]:
    runs = [r for r in results["runs"] if r.get("curve")]
    if not runs:
        return []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        steps = [p["step"] for p in r["curve"]]
        loss = np.array([p["loss"] for p in r["curve"]])
        k = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        a1.plot(steps[k - 1:], smooth, label=_label(r))
        val = [(p["step"], p["val_accuracy"]) for p in r["curve"] if "val_accuracy" in p]
        acc = np.array([p["accuracy"] for p in r["curve"]])
        a2.plot(steps[k - 1:], np.convolve(acc, np.ones(k) / k, mode="valid"), label=_label(r))
        if val:
            a2.plot(*zip(*val), ls="none", marker="x", color=a2.lines[-1].get_color())
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a1.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("accuracy (train batch; x: validation)")
    a2.legend(fontsize=7, ncol=2)
    return [_save(fig, out / "training_curves.png")]


def plot_gates(results: dict, out: Path) -> list[str]:
    """One figure per memory run: alpha, eta, theta histograms per layer, theta by token role per
    layer, and the memory norm over positions."""
    paths = []
    for r in results["runs"]:
        gates = r.get("gates")
        if not gates:
            continue
        fig, axes = plt.subplots(1, 5, figsize=(19, 3.4))
        for li, g in enumerate(gates):
            name = g["layer"].replace("model.layers.", "layer ").replace(".mixer.memory", "")
            for ax, gate in zip(axes[:3], ("alpha", "eta", "theta")):
                lo, hi = g[gate]["hist_range"]
                counts = np.array(g[gate]["hist"], dtype=float)
                edges = np.linspace(lo, hi, len(counts) + 1)
                ax.stairs(counts / max(1.0, counts.sum()), edges, label=name)
                ax.set_title(f"{gate} distribution")
                ax.set_xlabel(gate + (" (0..max_step_size)" if gate == "theta" else ""))
            roles = g["theta"]["mean_by_role"]
            names = list(roles)
            width = 0.8 / len(gates)
            axes[3].bar(np.arange(len(names)) + li * width, [roles[k] for k in names], width, label=name)
            axes[3].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
            axes[3].set_title("mean theta by token role")
            axes[4].plot(g["norm_positions"], g["norm"], marker=".", label=name)
            axes[4].set_title("memory norm over positions")
            axes[4].set_xlabel("position")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.suptitle(f"{_label(r)}: memory gates after training", fontsize=10)
        paths.append(_save(fig, out / f"gates_{_slug(_label(r))}.png"))
    return paths


def plot_sweep(results: dict, out: Path) -> list[str]:
    """Headline metric against the swept grid point, one line per model (only when ``--set`` swept)."""
    runs = [r for r in results["runs"] if r.get("overrides") and r.get("metrics")]
    if not runs:
        return []
    points = []
    for r in runs:
        key = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        if key not in points:
            points.append(key)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(points) + 3), 4))
    for model in dict.fromkeys(r["model"] for r in runs):
        ys = {", ".join(f"{k}={v}" for k, v in r["overrides"].items()): headline(r, results["task"])
              for r in runs if r["model"] == model}
        ax.plot(range(len(points)), [ys.get(p, np.nan) for p in points], marker="o", label=model)
    ax.set_xticks(range(len(points)), points, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel({"mqar": "recall accuracy", "niah": "accuracy", "lm": "bits per byte"}[results["task"]])
    ax.legend(fontsize=7)
    ax.set_title("sweep")
    return [_save(fig, out / "sweep.png")]


def make_plots(results: dict, out: Path) -> list[str]:
    """Every plot that applies to ``results`` -> the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    task = results["task"]
    if task == "mqar":
        paths += plot_mqar(results, out)
    elif task == "niah":
        paths += plot_niah(results, out)
    else:
        paths += plot_lm(results, out)
    paths += plot_curves(results, out)
    paths += plot_sweep(results, out)
    paths += plot_gates(results, out)
    return paths
