"""Benchmark ``chunk_momentum_delta_rule`` against fla's chunked (gated) delta rule at equal shapes.

Providers (each timed forward only and forward + backward):

- ``momentum_delta_rule``: ours, ``titans_layers.ops.chunk_momentum_delta_rule``;
- ``fla_chunk_gated_delta_rule``: ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``;
- ``fla_chunk_delta_rule``: ``fla.ops.delta_rule.chunk_delta_rule``.

All take L2-normalised q and k, the same v and the same chunk size (fla's ops accept 16, 32 and 64
too); fla is called with ``use_qk_l2norm_in_kernel=False`` so only the kernels are compared. Gates:
ours alpha, eta ~ U[0, 1], theta ~ 0.1 * U[0, 1]; fla beta ~ U[0, 1] and, for the gated rule, the
log decay g = logsigmoid(randn) in float32 (as fla's GatedDeltaNet layer passes it). In
forward-only mode no input requires grad (so no op keeps anything for a backward pass).

Usage (from the repo root)::

    python -m benchmarks.ops.benchmark_momentum_delta_rule                     # full sweep, CUDA
    python -m benchmarks.ops.benchmark_momentum_delta_rule --seqlens 4096 --head-dims 128 --chunk-sizes 16,64
    TRITON_INTERPRET=1 python -m benchmarks.ops.benchmark_momentum_delta_rule --quick   # CPU smoke test

Writes ``<out>/ops_momentum_delta_rule_<device>_<timestamp>.json`` (environment, arguments, one
entry per provider x mode x shape) and a ``.md`` with the same stem (one table per mode, also
printed). On CPU the fla providers are skipped (their kernels need CUDA) and timings come from a
short ``perf_counter`` loop: they only show that the script runs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks import common

OURS = "momentum_delta_rule"
FLA_GATED = "fla_chunk_gated_delta_rule"
FLA_DELTA = "fla_chunk_delta_rule"
PROVIDERS = (OURS, FLA_GATED, FLA_DELTA)

# Column headers of the Markdown tables, and the ratio columns (numerator, denominator, header).
LABELS = {OURS: "ours (ms)", FLA_GATED: "fla gated_delta (ms)", FLA_DELTA: "fla delta (ms)"}
RATIOS = ((OURS, FLA_GATED, "ours / gated_delta"), (OURS, FLA_DELTA, "ours / delta"))
ROW_KEYS = ("B", "T", "H", "K", "V", "chunk_size")

FULL = dict(batch=1, seqlens=[1024, 2048, 4096, 8192, 16384, 32768], heads=[16], head_dims=[64, 128],
            chunk_sizes=[64], warmup_ms=25, rep_ms=100, host_reps=3)
QUICK = dict(batch=1, seqlens=[256, 512], heads=[2], head_dims=[64], chunk_sizes=[64], warmup_ms=5, rep_ms=20,
             host_reps=2)


@dataclass(frozen=True)
class Shape:
    """Problem size of one entry: batch, length, heads, key and value head dims, chunk size."""

    B: int
    T: int
    H: int
    K: int
    V: int
    chunk_size: int


@dataclass
class Entry:
    """One row of the JSON output."""

    provider: str
    mode: str
    B: int
    T: int
    H: int
    K: int
    V: int
    chunk_size: int
    dtype: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    peak_mem_mb: float | None
    error: str | None


# --------------------------------------------------------------------------------------------
# Inputs and provider calls
# --------------------------------------------------------------------------------------------

def _leaf(x: torch.Tensor, dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    """``x`` cast to ``dtype`` as a fresh leaf tensor."""
    return x.to(dtype).detach().requires_grad_(requires_grad)


def make_qkv(s: Shape, dtype, device, requires_grad: bool):
    """L2-normalised q, k ``[B, T, H, K]`` and v ``[B, T, H, V]``."""
    q = F.normalize(torch.randn(s.B, s.T, s.H, s.K, device=device), p=2, dim=-1)  # [B, T, H, K]
    k = F.normalize(torch.randn(s.B, s.T, s.H, s.K, device=device), p=2, dim=-1)  # [B, T, H, K]
    v = torch.randn(s.B, s.T, s.H, s.V, device=device)  # [B, T, H, V]
    return tuple(_leaf(x, dtype, requires_grad) for x in (q, k, v))


def build_ours(s: Shape, dtype, device, requires_grad: bool):
    """Forward closure of ``chunk_momentum_delta_rule`` and its leaf inputs."""
    from titans_layers.ops import chunk_momentum_delta_rule as op
    q, k, v = make_qkv(s, dtype, device, requires_grad)
    alpha = _leaf(torch.rand(s.B, s.T, s.H, device=device), dtype, requires_grad)  # [B, T, H] forget gate
    eta = _leaf(torch.rand(s.B, s.T, s.H, device=device), dtype, requires_grad)  # [B, T, H] momentum decay
    theta = _leaf(0.1 * torch.rand(s.B, s.T, s.H, device=device), dtype, requires_grad)  # [B, T, H] step size

    def forward() -> torch.Tensor:
        o, _ = op(q, k, v, alpha, eta, theta, chunk_size=s.chunk_size)  # [B, T, H, V]
        return o

    return forward, [q, k, v, alpha, eta, theta]


def build_fla_gated(s: Shape, dtype, device, requires_grad: bool):
    """Forward closure of fla's ``chunk_gated_delta_rule`` and its leaf inputs."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    q, k, v = make_qkv(s, dtype, device, requires_grad)
    g = _leaf(F.logsigmoid(torch.randn(s.B, s.T, s.H, device=device)), torch.float32, requires_grad)  # [B, T, H]
    beta = _leaf(torch.rand(s.B, s.T, s.H, device=device), dtype, requires_grad)  # [B, T, H]

    def forward() -> torch.Tensor:
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=False,
                                      chunk_size=s.chunk_size)  # [B, T, H, V]
        return o

    return forward, [q, k, v, g, beta]


def build_fla_delta(s: Shape, dtype, device, requires_grad: bool):
    """Forward closure of fla's ``chunk_delta_rule`` and its leaf inputs."""
    from fla.ops.delta_rule import chunk_delta_rule

    q, k, v = make_qkv(s, dtype, device, requires_grad)
    beta = _leaf(torch.rand(s.B, s.T, s.H, device=device), dtype, requires_grad)  # [B, T, H]

    def forward() -> torch.Tensor:
        o, _ = chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=False,
                                chunk_size=s.chunk_size)  # [B, T, H, V]
        return o

    return forward, [q, k, v, beta]


BUILDERS = {OURS: build_ours, FLA_GATED: build_fla_gated, FLA_DELTA: build_fla_delta}


def skip_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run here (None when it can)."""
    if provider == OURS:
        if device.type != "cuda" and not common.is_interpreting():
            return "needs CUDA, or TRITON_INTERPRET=1 on CPU"
        return None
    return common.fla_skip_reason(device)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def make_closure(forward: Callable[[], torch.Tensor], s: Shape, mode: str, dtype, device) -> Callable[[], None]:
    """The timed closure: ``forward()`` alone, or forward then backward with a fixed random grad of o."""
    if mode == "fwd":
        return forward
    do = torch.randn(s.B, s.T, s.H, s.V, device=device, dtype=dtype)  # [B, T, H, V] fixed grad of o

    def fwdbwd() -> None:
        torch.autograd.backward(forward(), do)

    return fwdbwd


def build_timed(build: Callable, s: Shape, mode: str, dtype, device) -> tuple[Callable[[], None], list]:
    """The timed closure of ``mode`` (:func:`make_closure`) around the forward that ``build`` (a
    ``(shape, dtype, device, requires_grad) -> (forward, leaves)`` builder, e.g. one of
    :data:`BUILDERS`) makes at shape ``s``, and its leaf inputs (requiring grad in fwdbwd mode)."""
    forward, leaves = build(s, dtype, device, requires_grad=(mode == "fwdbwd"))
    return make_closure(forward, s, mode, dtype, device), leaves


def run_entry(provider: str, mode: str, s: Shape, args, device) -> Entry:
    """Measure one (provider, mode, shape) on fresh inputs (``common.measure_fresh``)."""
    build = functools.partial(build_timed, BUILDERS[provider], s, mode, common.DTYPES[args.dtype], device)
    m = common.measure_fresh(build, device, args, backward=(mode == "fwdbwd"))
    return Entry(provider, mode, s.B, s.T, s.H, s.K, s.V, s.chunk_size, args.dtype,
                 m.median_ms, m.p20_ms, m.p80_ms, m.peak_mem_mb, m.error)


def shapes(args) -> list[Shape]:
    """All (T, H, head dim, chunk size) combinations, T varying fastest."""
    return [Shape(args.batch, T, H, d, d, C)
            for H, d, C, T in itertools.product(args.heads, args.head_dims, args.chunk_sizes, args.seqlens)]


def format_entry(e: Entry) -> str:
    """One progress line."""
    head = f"[{e.provider:>26}] {e.mode:<6} B={e.B} T={e.T:<6} H={e.H} K={e.K} V={e.V} C={e.chunk_size}"
    if e.error:
        return f"{head}: {e.error}"
    return f"{head}: {e.median_ms:.3f} ms (p20 {e.p20_ms:.3f}, p80 {e.p80_ms:.3f}){common.peak_note(e.peak_mem_mb)}"


def run(args, device) -> tuple[list[Entry], dict[str, str]]:
    """Measure every provider x mode x shape that can run here. Returns (entries, skipped providers)."""
    active, skipped = common.active_providers(args.providers, skip_reason, device)
    run_one = functools.partial(run_entry, args=args, device=device)
    return common.sweep(shapes(args), args.modes, active, run_one, format_entry), skipped


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def mode_section(mode: str, rows: list[dict], args) -> list[str]:
    """The table of one mode: median ms per provider, and the ratios of ours to fla."""
    columns, ratios = common.provider_columns(args.providers, LABELS, RATIOS)
    table = common.comparison_table(rows, row_keys=ROW_KEYS, columns=columns, ratios=ratios)
    return [f"## {common.MODE_TITLES[mode]}", "", table, ""]


def markdown_report(entries: list[Entry], skipped: dict[str, str], env: dict, args) -> str:
    """Environment, then one table per mode (median ms per provider, and ratios of ours to fla)."""
    note = (f"Median ms ({'triton do_bench' if env['device_type'] == 'cuda' else 'perf_counter loop'}); "
            "ratio columns are ours / fla (above 1: ours is slower).")
    return common.mode_report(f"# chunk_momentum_delta_rule vs fla ({args.dtype})", env, [note], entries, args.modes,
                              functools.partial(mode_section, args=args), skipped,
                              lambda e: f"{e['provider']} {e['mode']} T={e['T']} H={e['H']} K={e['K']} "
                                        f"C={e['chunk_size']}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line; sizes not given come from ``--quick`` or the full defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, help=f"batch size B (default {FULL['batch']})")
    p.add_argument("--seqlens", type=common.int_list, help=f"comma-separated lengths T (default {FULL['seqlens']})")
    p.add_argument("--heads", type=common.int_list, help=f"comma-separated head counts H (default {FULL['heads']})")
    p.add_argument("--head-dims", type=common.int_list,
                   help=f"comma-separated head dims, K = V (default {FULL['head_dims']})")
    p.add_argument("--chunk-sizes", type=common.int_list,
                   help=f"comma-separated chunk sizes from 16, 32, 64, used by every provider "
                        f"(default {FULL['chunk_sizes']})")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16",
                   help="dtype of q, k, v and gates (default bf16)")
    common.add_mode_and_provider_args(p, PROVIDERS)
    common.add_timing_and_output_args(p, FULL)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke-test config {QUICK} (runs on CPU under TRITON_INTERPRET=1); "
                        "explicit size flags still win")
    args = p.parse_args(argv)
    return common.apply_preset(args, QUICK if args.quick else FULL)


def main(argv=None) -> None:
    """Run the benchmark the command line ``argv`` asks for and write its results."""
    args = parse_args(argv)
    device = common.default_device()
    env = common.start_run(device, args)
    entries, skipped = run(args, device)
    report = markdown_report(entries, skipped, env, args)
    common.save_run("ops_momentum_delta_rule", args, env, entries, skipped, report)


if __name__ == "__main__":
    main()
