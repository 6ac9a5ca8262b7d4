"""Benchmark the ``NeuralMemory`` layer against fla's Mamba2, DeltaNet and GatedDeltaNet layers.

Every provider is a whole token-mixing layer at the same hidden size D, called the way a model
calls it (``layer(x)[0]`` on ``x`` ``[B, T, D]``), timed forward only and forward + backward
(gradients of x and of every parameter):

- ``titans_linear``: ``NeuralMemory(memory="linear")``, heads of ``head_dim``, chunk 64 (Triton on CUDA);
- ``titans_mlp``: ``NeuralMemory(memory="mlp")``, Dh = 2 * head_dim (the PyTorch dual form until
  the MLP kernels land);
- ``fla_mamba2``: ``fla.layers.Mamba2`` (expand 2, state 128, heads of 64);
- ``fla_deltanet``: ``fla.layers.DeltaNet`` (heads of ``head_dim``);
- ``fla_gated_deltanet``: ``fla.layers.GatedDeltaNet`` (heads of ``head_dim``, expand_v 1);
- ``titans_pytorch_mlp``: titans-pytorch's ``NeuralMemory`` (lucidrains, 0.5.x) with the same heads,
  chunk size and a two-layer ``MemoryMLP`` of the same hidden width (its default layer-norm and
  residual wrapper of the memory model stay on), called as ``memory(x)[0]``.

Reported: median ms, tokens per second (B * T / median) and peak memory; ratios ours / fla.

Usage (from the repo root)::

    python -m benchmarks.layers.benchmark_layers                           # full sweep, CUDA
    python -m benchmarks.layers.benchmark_layers --seqlens 4096 --hidden 2048
    TRITON_INTERPRET=1 python -m benchmarks.layers.benchmark_layers --quick  # CPU smoke test

Writes ``<out>/layers_<device>_<timestamp>.json`` and ``.md``. On CPU the fla layers are skipped
(their kernels need CUDA) and times come from a ``perf_counter`` loop: they only show that it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks import common

PROVIDERS = ("titans_linear", "titans_mlp", "fla_mamba2", "fla_deltanet", "fla_gated_deltanet",
             "titans_pytorch_mlp")
MODES = ("fwd", "fwdbwd")
LABELS = {"titans_linear": "linear (ms)", "titans_mlp": "mlp (ms)", "fla_mamba2": "Mamba2 (ms)",
          "fla_deltanet": "DeltaNet (ms)", "fla_gated_deltanet": "GatedDeltaNet (ms)",
          "titans_pytorch_mlp": "titans-pytorch (ms)"}
RATIOS = (("titans_linear", "fla_mamba2", "linear / Mamba2"), ("titans_linear", "fla_gated_deltanet",
                                                                "linear / GDN"),
          ("titans_mlp", "fla_gated_deltanet", "mlp / GDN"),
          ("titans_mlp", "titans_pytorch_mlp", "mlp / titans-pytorch"))
ROW_KEYS = ("B", "T", "D", "head_dim")

FULL = dict(batch=1, seqlens=[2048, 4096, 8192, 16384], hidden=[2048], head_dims=[128], warmup_ms=25, rep_ms=100,
            host_reps=3)
QUICK = dict(batch=1, seqlens=[128], hidden=[64], head_dims=[32], warmup_ms=5, rep_ms=20, host_reps=1)


@dataclass
class Entry:
    """One row of the JSON output."""

    provider: str
    mode: str
    B: int
    T: int
    D: int
    head_dim: int
    dtype: str
    params: int | None
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    tokens_per_s: float | None
    peak_mem_mb: float | None
    error: str | None


def build_layer(provider: str, D: int, head_dim: int) -> torch.nn.Module:
    """The layer of ``provider`` at hidden size D."""
    H = max(1, D // head_dim)
    if provider == "titans_linear":
        from titans_layers.modules import NeuralMemory
        return NeuralMemory(D, H, memory="linear", head_dim=head_dim, chunk_size=64)
    if provider == "titans_mlp":
        from titans_layers.modules import NeuralMemory
        return NeuralMemory(D, H, memory="mlp", head_dim=head_dim, chunk_size=64, mlp_expansion=2)
    if provider == "titans_pytorch_mlp":
        from titans_pytorch import MemoryMLP
        from titans_pytorch import NeuralMemory as TitansPytorchMemory
        return TitansPytorchMemory(D, chunk_size=64, dim_head=head_dim, heads=H,
                                   model=MemoryMLP(head_dim, depth=2, expansion_factor=2.0))
    import fla.layers
    if provider == "fla_mamba2":
        return fla.layers.Mamba2(num_heads=2 * D // 64, head_dim=64, hidden_size=D, state_size=128, expand=2)
    if provider == "fla_deltanet":
        return fla.layers.DeltaNet(hidden_size=D, num_heads=H)
    if provider == "fla_gated_deltanet":
        return fla.layers.GatedDeltaNet(hidden_size=D, num_heads=H, head_dim=head_dim, expand_v=1)
    raise ValueError(f"unknown provider {provider!r}")


def skip_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run here (None when it can)."""
    if provider == "titans_pytorch_mlp":
        return None if importlib.util.find_spec("titans_pytorch") else "titans-pytorch is not installed"
    if provider.startswith("titans"):
        return None
    if importlib.util.find_spec("fla") is None:
        return "fla is not installed"
    if device.type != "cuda":
        return "fla's kernels need CUDA"
    return None


def make_closure(layer: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """``layer(x)`` alone (no autograd), or forward then backward with a fixed random grad."""
    if mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                layer(x)
        return fwd
    do = torch.randn_like(x)  # [B, T, D]

    def fwdbwd() -> None:
        torch.autograd.backward(layer(x)[0], do)

    return fwdbwd


def run_entry(provider: str, mode: str, B: int, T: int, D: int, head_dim: int, args, device) -> Entry:
    dtype = common.DTYPES[args.dtype]
    torch.manual_seed(0)
    layer = x = fn = None
    params = None
    try:
        layer = build_layer(provider, D, head_dim).to(device=device, dtype=dtype)
        params = sum(p.numel() for p in layer.parameters())
        x = torch.randn(B, T, D, device=device, dtype=dtype).requires_grad_(mode == "fwdbwd")  # [B, T, D]
        fn = make_closure(layer, x, mode)
        leaves = [x, *layer.parameters()] if mode == "fwdbwd" else []
        m = common.measure(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, host_reps=args.host_reps,
                           grad_to_none=leaves)
    except Exception as exc:  # noqa: BLE001 - e.g. OOM while building
        m = common.Measurement(error=common.describe_error(exc))
    finally:
        layer = x = fn = leaves = None  # noqa: F841 - free before the next entry
        common.free_memory(device)
    tps = B * T / (m.median_ms / 1e3) if m.median_ms else None
    return Entry(provider, mode, B, T, D, head_dim, args.dtype, params, m.median_ms, m.p20_ms, m.p80_ms, tps,
                 m.peak_mem_mb, m.error)


def format_entry(e: Entry) -> str:
    head = f"[{e.provider:>18}] {e.mode:<6} B={e.B} T={e.T:<6} D={e.D} d={e.head_dim}"
    if e.error:
        return f"{head}: {e.error}"
    mem = f", peak {e.peak_mem_mb:.0f} MiB" if e.peak_mem_mb is not None else ""
    return f"{head}: {e.median_ms:.3f} ms, {e.tokens_per_s / 1e3:.1f} K tok/s{mem} ({e.params / 1e6:.2f} M params)"


def run(args, device) -> tuple[list[Entry], dict[str, str]]:
    active, skipped = common.active_providers(args.providers, skip_reason, device)
    entries = []
    for D, d, T in itertools.product(args.hidden, args.head_dims, args.seqlens):
        for mode in args.modes:
            for provider in active:
                entries.append(run_entry(provider, mode, args.batch, T, D, d, args, device))
                print(format_entry(entries[-1]), flush=True)
    return entries, skipped


def markdown_report(entries: list[Entry], skipped: dict[str, str], env: dict, args) -> str:
    rows = [vars(e) for e in entries]
    columns = [(p, LABELS[p]) for p in args.providers]
    ratios = [r for r in RATIOS if r[0] in args.providers and r[1] in args.providers]
    titles = {"fwd": "Forward", "fwdbwd": "Forward + backward"}
    parts = [f"# NeuralMemory vs fla layers ({args.dtype})", "", common.environment_markdown(env), "",
             "Median ms per layer call; ratio columns are ours / fla (above 1: ours is slower).", ""]
    for mode in args.modes:
        mode_rows = [r for r in rows if r["mode"] == mode]
        parts += [f"## {titles[mode]}", "",
                  common.comparison_table(mode_rows, row_keys=ROW_KEYS, columns=columns, ratios=ratios), "",
                  "Peak memory (MiB):", "",
                  common.comparison_table(mode_rows, row_keys=ROW_KEYS, value_key="peak_mem_mb",
                                          columns=[(p, h.replace(" (ms)", "")) for p, h in columns]),
                  ""]
    parts += common.report_footer(rows, skipped, lambda e: f"{e['provider']} {e['mode']} T={e['T']} D={e['D']}")
    return "\n".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, help=f"batch size B (default {FULL['batch']})")
    p.add_argument("--seqlens", type=common.int_list, help=f"comma-separated lengths T (default {FULL['seqlens']})")
    p.add_argument("--hidden", type=common.int_list, help=f"comma-separated hidden sizes D (default {FULL['hidden']})")
    p.add_argument("--head-dims", type=common.int_list, help=f"comma-separated head dims (default {FULL['head_dims']})")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16", help="parameter and input dtype")
    p.add_argument("--modes", type=common.choice_list(MODES), default=list(MODES), help="fwd, fwdbwd or both")
    p.add_argument("--providers", type=common.choice_list(PROVIDERS), default=list(PROVIDERS),
                   help="which layers to time")
    p.add_argument("--warmup-ms", type=int, help="do_bench warm-up time, ms")
    p.add_argument("--rep-ms", type=int, help="do_bench repetition time, ms")
    p.add_argument("--host-reps", type=int, help="timed calls per entry off CUDA")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and Markdown results")
    p.add_argument("--quick", action="store_true", help=f"tiny smoke-test config {QUICK}; explicit flags still win")
    args = p.parse_args(argv)
    return common.apply_preset(args, QUICK if args.quick else FULL)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = common.default_device()
    env = common.collect_environment(device, common.package_versions())
    print(f"device: {env['device']}; modes {args.modes}; providers {args.providers}")
    entries, skipped = run(args, device)
    common.save_results(args.out, f"layers_{env['device_slug']}_{common.timestamp()}", environment=env, args=args,
                        entries=entries, report=markdown_report(entries, skipped, env, args),
                        skipped_providers=skipped)


if __name__ == "__main__":
    main()
