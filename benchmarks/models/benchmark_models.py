"""Whole-model training throughput and peak memory: the Titans variants against fla's Mamba2,
DeltaNet and GatedDeltaNet causal LMs at roughly equal parameter count.

Providers:

- ``titans_<variant>`` for variant in mac, mag, mal, lmm, mac_mal:
  :class:`titans_layers.models.TitansForCausalLM` (``--memory`` linear or mlp);
- ``fla_mamba2``, ``fla_deltanet``, ``fla_gated_deltanet``: fla's ``*ForCausalLM`` with fla's
  defaults (fused norms, fused cross-entropy), heads sized from ``--hidden-size`` / ``--num-heads``.

Equal size. The target is the parameter count of ``titans_mac`` with ``--num-layers`` layers;
every provider gets the layer count that brings its total (embeddings and head included, the same
for all) closest to it. Parameters are counted on the meta device, so sizing costs nothing.

Measured: one training step, ``loss = model(ids, labels=ids).loss; loss.backward()`` (no
optimizer step) in ``--dtype`` parameters, ``B = max(1, tokens // T)`` sequences of T tokens;
tokens/s = ``B * T / median step time``, and the peak allocated CUDA memory of a step. With
``--modes fwd,fwdbwd`` the forward alone (no grad, no cache) is timed too.

Usage (from the repo root)::

    python -m benchmarks.models.benchmark_models                              # full sweep, CUDA
    python -m benchmarks.models.benchmark_models --seqlens 4096 --providers titans_mac,fla_gated_deltanet
    TRITON_INTERPRET=1 python -m benchmarks.models.benchmark_models --quick   # CPU smoke test

Writes ``<out>/models_<device>_<timestamp>.json`` (environment, arguments, sizes, one entry per
provider x mode x T), a ``.md`` with the same stem (throughput, memory and size tables) and,
when matplotlib is installed, a ``.png`` plot of both against T. On CPU the fla providers are
skipped (their autotuned Triton kernels need CUDA) and the timings only show that the script runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks import common

TITANS_VARIANTS = ("mac", "mag", "mal", "lmm", "mac_mal")
FLA_MODELS = ("mamba2", "deltanet", "gated_deltanet")
PROVIDERS = tuple(f"titans_{v}" for v in TITANS_VARIANTS) + tuple(f"fla_{m}" for m in FLA_MODELS)
REFERENCE = "titans_mac"

FULL = dict(hidden_size=1024, num_heads=16, num_layers=12, vocab_size=32000, seqlens=[2048, 4096, 8192, 16384],
            tokens=32768, segment_size=512, window_size=512, chunk_size=64, dtype="bf16", warmup_ms=25, rep_ms=200,
            host_reps=3)
QUICK = dict(hidden_size=64, num_heads=4, num_layers=2, vocab_size=256, seqlens=[128, 256], tokens=256,
             segment_size=32, window_size=32, chunk_size=16, dtype="fp32", warmup_ms=5, rep_ms=20, host_reps=2)


@dataclass
class Entry:
    """One row of the JSON output."""

    provider: str
    mode: str
    B: int
    T: int
    num_layers: int
    params_m: float
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    ktokens_per_s: float | None
    peak_mem_gib: float | None
    error: str | None


# --------------------------------------------------------------------------------------------
# Models and their sizes
# --------------------------------------------------------------------------------------------

def make_config(provider: str, num_layers: int, args):
    """The Hugging Face config of ``provider`` with ``num_layers`` layers."""
    common_args = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=num_layers)
    if provider.startswith("titans_"):
        from titans_layers.models import TitansConfig
        return TitansConfig(**common_args, num_heads=args.num_heads, variant=provider[len("titans_"):],
                            memory=args.memory, chunk_size=args.chunk_size, segment_size=args.segment_size,
                            window_size=args.window_size, use_cache=False)
    head_dim = args.hidden_size // args.num_heads
    if provider == "fla_mamba2":
        from fla.models import Mamba2Config
        return Mamba2Config(**common_args, head_dim=head_dim, expand=2, use_cache=False)
    if provider == "fla_deltanet":
        from fla.models import DeltaNetConfig
        return DeltaNetConfig(**common_args, num_heads=args.num_heads, use_cache=False)
    if provider == "fla_gated_deltanet":
        from fla.models import GatedDeltaNetConfig
        return GatedDeltaNetConfig(**common_args, num_heads=args.num_heads, head_dim=head_dim, use_cache=False)
    raise ValueError(f"`provider` must be one of {PROVIDERS}, got {provider!r}")


def model_class(provider: str):
    """The causal-LM class of ``provider``."""
    if provider.startswith("titans_"):
        from titans_layers.models import TitansForCausalLM
        return TitansForCausalLM
    from fla.models import DeltaNetForCausalLM, GatedDeltaNetForCausalLM, Mamba2ForCausalLM
    return {"fla_mamba2": Mamba2ForCausalLM, "fla_deltanet": DeltaNetForCausalLM,
            "fla_gated_deltanet": GatedDeltaNetForCausalLM}[provider]


def count_params(provider: str, num_layers: int, args) -> int:
    """Parameters of ``provider`` with ``num_layers`` layers, built on the meta device."""
    with torch.device("meta"):
        model = model_class(provider)(make_config(provider, num_layers, args))
    return sum(p.numel() for p in model.parameters())


def fit_layers(provider: str, target: int, args) -> tuple[int, int]:
    """``(layers, params)`` with the parameter count closest to ``target`` (at least one layer).
    The count is affine in the layer count for single-kind stacks; neighbours are checked for
    the alternating ``mac_mal``."""
    p1, p2 = count_params(provider, 1, args), count_params(provider, 2, args)
    guess = max(1, round(1 + (target - p1) / max(1, p2 - p1)))
    candidates = {n: count_params(provider, n, args) for n in {max(1, guess - 1), guess, guess + 1}}
    best = min(candidates, key=lambda n: (abs(candidates[n] - target), n))
    return best, candidates[best]


def skip_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run here (None when it can)."""
    if provider.startswith("fla_"):
        return common.fla_skip_reason(device, "fla's autotuned Triton kernels need CUDA")
    return None


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def make_step(model, ids: torch.Tensor, mode: str) -> Callable[[], None]:
    """The timed closure: a training step's forward + backward, or a no-grad forward."""
    if mode == "fwd":
        def forward() -> None:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        return forward

    def train_step() -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return train_step


def build_step(provider: str, mode: str, B: int, T: int, num_layers: int, args, device
               ) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """The timed closure of ``mode`` (:func:`make_step`) of a fresh ``provider`` model with
    ``num_layers`` layers on random ids ``[B, T]``, and the model's parameters."""
    model = model_class(provider)(make_config(provider, num_layers, args)).to(device=device,
                                                                            dtype=common.DTYPES[args.dtype])
    model.train(mode == "fwdbwd")
    ids = torch.randint(0, args.vocab_size, (B, T), device=device)  # [B, T]
    return make_step(model, ids, mode), list(model.parameters())


def run_entry(provider: str, mode: str, T: int, num_layers: int, params: int, args, device) -> Entry:
    """Measure one (mode, T) of a fresh model (``common.measure_fresh``); ``B = max(1, tokens // T)``."""
    B = max(1, args.tokens // T)
    build = functools.partial(build_step, provider, mode, B, T, num_layers, args, device)
    m = common.measure_fresh(build, device, args, backward=(mode == "fwdbwd"))
    ktok = B * T / m.median_ms if m.median_ms else None  # tokens per ms = thousands of tokens per s
    peak = m.peak_mem_mb / 1024 if m.peak_mem_mb is not None else None
    return Entry(provider, mode, B, T, num_layers, params / 1e6, m.median_ms, m.p20_ms, m.p80_ms, ktok, peak,
                 m.error)


def format_entry(e: Entry) -> str:
    """One progress line."""
    head = f"[{e.provider:>20}] {e.mode:<6} B={e.B:<3} T={e.T:<6} L={e.num_layers:<3} {e.params_m:.1f}M"
    if e.error:
        return f"{head}: {e.error}"
    mem = f", peak {e.peak_mem_gib:.2f} GiB" if e.peak_mem_gib is not None else ""
    return f"{head}: {e.median_ms:.1f} ms, {e.ktokens_per_s:.1f} ktok/s{mem}"


def run(args, device) -> tuple[list[Entry], dict[str, str], dict[str, tuple[int, int]]]:
    """Size every runnable provider, then measure every provider x mode x T.
    Returns (entries, skipped providers, ``{provider: (layers, params)}``)."""
    active, skipped = common.active_providers(args.providers, skip_reason, device)
    target = count_params(REFERENCE, args.num_layers, args)
    sizes = {p: fit_layers(p, target, args) for p in active}
    print(f"target size: {target / 1e6:.1f}M parameters ({REFERENCE}, {args.num_layers} layers); "
          + ", ".join(f"{p}: {n} layers {c / 1e6:.1f}M" for p, (n, c) in sizes.items()))
    entries = common.sweep(args.seqlens, args.modes, active,
                           lambda provider, mode, T: run_entry(provider, mode, T, *sizes[provider], args, device),
                           format_entry)
    return entries, skipped, sizes


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def mode_section(mode: str, rows: list[dict], columns: list[tuple[str, str]], env: dict) -> list[str]:
    """The throughput table of one mode and, on CUDA, its peak-memory table."""
    title = {"fwd": "Forward (no grad)", "fwdbwd": "Training step (forward + backward)"}[mode]
    parts = [f"## {title}: thousands of tokens per second (higher is better)", "",
             common.comparison_table(rows, row_keys=("B", "T"), columns=columns, value_key="ktokens_per_s"), ""]
    if env["device_type"] == "cuda":
        parts += [f"## {title}: peak memory, GiB", "",
                  common.comparison_table(rows, row_keys=("B", "T"), columns=columns, value_key="peak_mem_gib"), ""]
    return parts


def markdown_report(entries: list[Entry], skipped: dict[str, str], sizes: dict, env: dict, args) -> str:
    """Environment, sizes, then per mode a throughput table and a peak-memory table."""
    size_table = common.markdown_table(["provider", "layers", "parameters (M)"],
                                       [[p, n, f"{c / 1e6:.1f}"] for p, (n, c) in sizes.items()], align_right_from=1)
    notes = [f"Width {args.hidden_size}, {args.num_heads} heads, vocab {args.vocab_size}; Titans segment "
             f"{args.segment_size}, window {args.window_size}, memory chunk {args.chunk_size}; "
             f"B = max(1, {args.tokens} // T).", "## Sizes", size_table]
    if env["device_type"] != "cuda":
        notes.append("**Not GPU figures**: CPU smoke run (perf_counter loop; the JSON's peak memory is the RSS "
                     "increase of a step).")
    columns = [(p, p) for p in args.providers if p in sizes]
    return common.mode_report(f"# Titans models vs fla models ({args.dtype}, memory={args.memory})", env, notes,
                              entries, args.modes, functools.partial(mode_section, columns=columns, env=env),
                              skipped, lambda e: f"{e['provider']} {e['mode']} T={e['T']}")


def plot(entries: list[Entry], path, mode: str = "fwdbwd") -> bool:
    """Throughput and peak memory against T, one line per provider; False without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for provider in dict.fromkeys(e.provider for e in entries):
        ok = [e for e in entries if e.provider == provider and e.mode == mode and not e.error]
        if ok:
            ax_t.plot([e.T for e in ok], [e.ktokens_per_s for e in ok], marker="o", label=provider)
            if ok[0].peak_mem_gib is not None:
                ax_m.plot([e.T for e in ok], [e.peak_mem_gib for e in ok], marker="o", label=provider)
    for ax, label in ((ax_t, "thousand tokens / s"), (ax_m, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"training step ({mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line; sizes not given come from ``--quick`` or the full defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, kind, text in (("hidden-size", int, "model width"), ("num-heads", int, "heads"),
                             ("num-layers", int, f"layers of the reference {REFERENCE} (sets the target size)"),
                             ("vocab-size", int, "vocabulary"), ("tokens", int, "tokens per step (B = tokens // T)"),
                             ("segment-size", int, "MAC segment"), ("window-size", int, "MAG / MAL window"),
                             ("chunk-size", int, "memory chunk (16, 32 or 64 for the Triton kernels)"),
                             ("warmup-ms", int, "do_bench warm-up, ms"), ("rep-ms", int, "do_bench repetitions, ms"),
                             ("host-reps", int, "timed calls per entry off CUDA")):
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=kind, help=f"{text} (default {FULL[key]}; --quick {QUICK[key]})")
    p.add_argument("--seqlens", type=common.int_list, help=f"comma-separated lengths T (default {FULL['seqlens']})")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), help="parameter dtype (default bf16; --quick fp32)")
    p.add_argument("--memory", choices=("linear", "mlp"), default="linear", help="Titans memory (default linear)")
    p.add_argument("--modes", type=common.choice_list(common.MODES), default=["fwdbwd"],
                   help="comma-separated: fwdbwd (training step), fwd (no-grad forward) (default fwdbwd)")
    p.add_argument("--providers", type=common.choice_list(PROVIDERS), default=list(PROVIDERS),
                   help=f"comma-separated providers (default all: {','.join(PROVIDERS)})")
    p.add_argument("--out", default="benchmarks/results", help="result directory (default benchmarks/results)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke-test sizes (runs on CPU under TRITON_INTERPRET=1); explicit flags still win")
    args = p.parse_args(argv)
    return common.apply_preset(args, QUICK if args.quick else FULL)


def main(argv=None) -> None:
    """Run the benchmark the command line ``argv`` asks for and write its results (and a plot)."""
    args = parse_args(argv)
    device = common.default_device()
    env = common.start_run(device, args)
    entries, skipped, sizes = run(args, device)
    _, md_path = common.save_run("models", args, env, entries, skipped,
                                 markdown_report(entries, skipped, sizes, env, args),
                                 sizes={p: {"layers": n, "params": c} for p, (n, c) in sizes.items()})
    png = md_path.with_suffix(".png")
    if plot(entries, png):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
