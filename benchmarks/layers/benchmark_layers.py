"""Benchmark the ``NeuralMemory`` layer against fla's Mamba2, DeltaNet and GatedDeltaNet layers.

Every provider is a whole token-mixing layer at the same hidden size D, called the way a model
calls it (``layer(x)[0]`` on ``x`` ``[B, T, D]``), timed forward only and forward + backward
(gradients of x and of every parameter):

- ``titans_linear``: ``NeuralMemory(memory="linear")``, heads of ``head_dim``, chunk 64 (Triton on CUDA);
- ``titans_mlp``: ``NeuralMemory(memory="mlp")``, Dh = 2 * head_dim (its Triton kernels on CUDA);
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
import functools
import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks import common

PROVIDERS = ("titans_linear", "titans_mlp", "fla_mamba2", "fla_deltanet", "fla_gated_deltanet",
             "titans_pytorch_mlp")
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
        return common.not_installed("titans_pytorch", "titans-pytorch")
    return None if provider.startswith("titans") else common.fla_skip_reason(device)


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


def build_call(provider: str, mode: str, B: int, T: int, D: int, head_dim: int, dtype: torch.dtype, device,
               params: list[int]) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """The timed closure of ``mode`` (:func:`make_closure`) calling the layer of ``provider`` on a
    random x ``[B, T, D]``, and its leaves: x and the layer's parameters. Appends the layer's
    parameter count to ``params`` as soon as it is built."""
    layer = build_layer(provider, D, head_dim).to(device=device, dtype=dtype)
    params.append(sum(p.numel() for p in layer.parameters()))
    x = torch.randn(B, T, D, device=device, dtype=dtype).requires_grad_(mode == "fwdbwd")  # [B, T, D]
    return make_closure(layer, x, mode), [x, *layer.parameters()]


def run_entry(provider: str, mode: str, point: tuple[int, int, int], args, device) -> Entry:
    """Measure one (provider, mode, point) on a fresh layer and input (``common.measure_fresh``);
    ``point`` is (hidden size D, head dim, length T), the batch size B is ``args.batch``."""
    D, head_dim, T = point
    B = args.batch
    params = []  # the layer's parameter count, once built
    build = functools.partial(build_call, provider, mode, B, T, D, head_dim, common.DTYPES[args.dtype], device, params)
    m = common.measure_fresh(build, device, args, backward=(mode == "fwdbwd"))
    return Entry(provider, mode, B, T, D, head_dim, args.dtype, params[0] if params else None, m.median_ms, m.p20_ms,
                 m.p80_ms, m.tokens_per_s(B * T), m.peak_mem_mb, m.error)


def format_entry(e: Entry) -> str:
    """One progress line."""
    head = f"[{e.provider:>18}] {e.mode:<6} B={e.B} T={e.T:<6} D={e.D} d={e.head_dim}"
    if e.error:
        return f"{head}: {e.error}"
    return (f"{head}: {e.median_ms:.3f} ms, {e.tokens_per_s / 1e3:.1f} K tok/s{common.peak_note(e.peak_mem_mb)} "
            f"({e.params / 1e6:.2f} M params)")


def run(args, device) -> tuple[list[Entry], dict[str, str]]:
    """Measure every provider x mode x (D, head dim, T) that can run here. Returns (entries, skipped
    providers)."""
    active, skipped = common.active_providers(args.providers, skip_reason, device)
    points = itertools.product(args.hidden, args.head_dims, args.seqlens)
    run_one = functools.partial(run_entry, args=args, device=device)
    return common.sweep(points, args.modes, active, run_one, format_entry), skipped


def mode_section(mode: str, rows: list[dict], args) -> list[str]:
    """The time table of one mode (with the ratios of ours to fla), then its peak-memory table."""
    columns, ratios = common.provider_columns(args.providers, LABELS, RATIOS)
    return [f"## {common.MODE_TITLES[mode]}", "",
            common.comparison_table(rows, row_keys=ROW_KEYS, columns=columns, ratios=ratios), "",
            "Peak memory (MiB):", "",
            common.comparison_table(rows, row_keys=ROW_KEYS, value_key="peak_mem_mb",
                                    columns=[(p, h.replace(" (ms)", "")) for p, h in columns]),
            ""]


def markdown_report(entries: list[Entry], skipped: dict[str, str], env: dict, args) -> str:
    """Environment, then per mode a table of median ms and one of peak memory."""
    return common.mode_report(f"# NeuralMemory vs fla layers ({args.dtype})", env,
                              ["Median ms per layer call; ratio columns are ours / fla (above 1: ours is slower)."],
                              entries, args.modes, functools.partial(mode_section, args=args), skipped,
                              lambda e: f"{e['provider']} {e['mode']} T={e['T']} D={e['D']}")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line; sizes not given come from ``--quick`` or the full defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, help=f"batch size B (default {FULL['batch']})")
    p.add_argument("--seqlens", type=common.int_list, help=f"comma-separated lengths T (default {FULL['seqlens']})")
    p.add_argument("--hidden", type=common.int_list, help=f"comma-separated hidden sizes D (default {FULL['hidden']})")
    p.add_argument("--head-dims", type=common.int_list, help=f"comma-separated head dims (default {FULL['head_dims']})")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16", help="parameter and input dtype")
    common.add_mode_and_provider_args(p, PROVIDERS)
    common.add_timing_and_output_args(p, FULL)
    p.add_argument("--quick", action="store_true", help=f"tiny smoke-test config {QUICK}; explicit flags still win")
    args = p.parse_args(argv)
    return common.apply_preset(args, QUICK if args.quick else FULL)


def main(argv=None) -> None:
    """Run the benchmark the command line ``argv`` asks for and write its results."""
    args = parse_args(argv)
    device = common.default_device()
    env = common.start_run(device, args)
    entries, skipped = run(args, device)
    common.save_run("layers", args, env, entries, skipped, markdown_report(entries, skipped, env, args))


if __name__ == "__main__":
    main()
