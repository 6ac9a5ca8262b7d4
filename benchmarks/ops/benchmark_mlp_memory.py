"""Benchmark the MLP-memory op against the linear op, fla's gated delta rule and titans-pytorch.

Providers (each timed forward only and forward + backward, at the same B, T, H, K = V and chunk
size C):

- ``mlp_memory``: ours, ``titans_layers.ops.chunk_mlp_memory`` (Triton) on CUDA and
  ``naive_chunk_mlp_memory`` (the vectorised PyTorch dual form, which *is* the CPU execution path)
  on CPU; ``f(x) = act(x W1) W2`` with W1 ``[K, Dh]``, W2 ``[Dh, V]``, Dh = expansion * K, from
  ``initial_state=(W1, W2)`` with a leading dim of 1 (a learned initial memory, receiving gradients
  in forward + backward mode);
- ``momentum_delta_rule``: the linear op at the same inputs, ``chunk_momentum_delta_rule`` on CUDA,
  ``naive_chunk_momentum_delta_rule`` on CPU;
- ``fla_chunk_gated_delta_rule``: ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``, with the
  inputs of ``benchmark_momentum_delta_rule`` (CUDA only);
- ``titans_pytorch``: titans-pytorch's ``NeuralMemory`` (lucidrains) with ``heads=H``,
  ``dim_head=K``, ``chunk_size=C`` and ``MemoryMLP(K, depth=2, expansion_factor=expansion)``, called
  as ``memory(x)`` on x ``[B, T, H * K]``. It is a layer, so to time only its store and retrieve
  its q/k/v and output projections are replaced by identities (``dim = H * K`` makes the shapes
  agree), its retrieve gate is removed, and its pre-RMSNorms and its LayerNorm + residual wrapper
  of the memory MLP are switched off (``pre_rmsnorm=False``, ``mem_model_norm_add_residual=False``).
  What remains and is timed: the step size, momentum and decay gates it computes from x (three
  ``[D, H]`` projections, negligible next to the memory), its per-token gradients at each
  chunk's start weights (``torch.func.vmap(grad(...))``), the momentum and decay scans over the
  per-chunk weights it materialises (``[B * H, T / C, K, Dh]`` per weight), and the retrieval
  through them. Its MLP uses GELU; pass ``--activation gelu`` to give ours the same. Its update is
  not the same function as ours (chunk-level gates, reads the previous chunk's weights): the
  comparison is of cost at equal sizes, not of outputs.

Inputs: q, k L2-normalised; v ~ N(0, 1); alpha ~ 0.1 * U[0, 1] (weak forgetting), eta ~ U[0, 1],
theta ~ 0.1 * U[0, 1]; W1, W2 ~ N(0, 1 / fan_in). In forward-only mode nothing requires grad (so
no op keeps anything for a backward pass); in forward + backward mode a fixed random cotangent of
o is back-propagated into every input (and titans-pytorch's parameters).

Reported per entry: median ms (p20, p80), tokens/s (B * T / median) and peak memory in MiB: on
CUDA the peak allocated memory during one call, inputs included; on CPU (Linux) the peak resident set
size increase during one call, inputs excluded, allocator slack included
(``common.cpu_peak_memory_mb``). Markdown tables of time and of peak memory against T, with ratio
columns ours / linear, ours / fla (above 1: ours is slower) and titans-pytorch / ours (above 1:
ours is faster).

Devices and defaults. On CUDA: bf16, B = 1, T 1K-16K, H = 16, K = V = 64, Dh = 256, C in {16, 64} (the
Triton ops take C in {16, 32, 64}; other sizes show as errors). On CPU (no CUDA, or ``--cpu``):
fp32, B = 1, H = 4, K = 64, Dh = 128, T in {1024, 2048}, C in {4, 16, 64}, timed with a
``perf_counter`` loop after one warm-up call; these timings are real (no Triton interpreter runs),
and fla is skipped (its kernels need CUDA). ``--threads N`` sets torch's CPU thread count.

Usage (from the repo root)::

    python -m benchmarks.ops.benchmark_mlp_memory                        # full sweep on a GPU
    python -m benchmarks.ops.benchmark_mlp_memory --cpu --threads 8      # the CPU path vs titans-pytorch
    python -m benchmarks.ops.benchmark_mlp_memory --seqlens 4096 --chunk-sizes 64 --expansions 2,4
    python -m benchmarks.ops.benchmark_mlp_memory --quick                # smoke test (CPU: seconds)
    python -m benchmarks.ops.benchmark_mlp_memory --batch 1,8 --seqlens 4096,16384 --chunk-sizes 64 \
        --providers mlp_memory,fla_chunk_gated_delta_rule --launches "default;BT=16;lowp_dots=1"

``--launches``: ";"-separated launch settings of our Triton kernels, each "default" or
comma-separated ``field=value`` of ``titans_layers.ops.mlp_memory.chunk.MLPLaunch`` (``BT``,
``fwd_BH``, ``bwd_BH``, ``fwd_warps``, ``bwd_warps``, ``lowp_dots`` 0 or 1). Ours runs once per setting, as the provider
``mlp_memory`` (default) or ``mlp_memory[<setting>]``, each with its own column and ratio to fla
and to the default: one GPU run compares tile sizes and warps. CUDA only (the CPU path has no
launch).

Writes ``<out>/ops_mlp_memory_<device>_<timestamp>.json`` (environment, arguments, one entry per
provider x mode x shape) and a ``.md`` with the same stem (also printed).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks import common
from benchmarks.ops.benchmark_momentum_delta_rule import Shape, build_fla_gated, build_timed, make_qkv

OURS = "mlp_memory"
LINEAR = "momentum_delta_rule"
FLA_GATED = "fla_chunk_gated_delta_rule"
TITANS_PYTORCH = "titans_pytorch"
PROVIDERS = (OURS, LINEAR, FLA_GATED, TITANS_PYTORCH)
ACTIVATIONS = ("silu", "gelu")

# Column headers of the Markdown tables, and the ratio columns (numerator, denominator, header).
LABELS = {OURS: "mlp (ours)", LINEAR: "linear (ours)", FLA_GATED: "fla gated_delta", TITANS_PYTORCH: "titans-pytorch"}
RATIOS = ((OURS, LINEAR, "mlp / linear"), (OURS, FLA_GATED, "mlp / gated_delta"),
          (TITANS_PYTORCH, OURS, "titans-pytorch / mlp"))
ROW_KEYS = ("B", "T", "H", "K", "Dh", "chunk_size")

FULL = dict(batch=[1], seqlens=[1024, 2048, 4096, 8192, 16384], heads=[16], head_dims=[64], expansions=[4],
            chunk_sizes=[16, 64], dtype="bf16", warmup_ms=25, rep_ms=100, host_reps=3)
CPU = dict(batch=[1], seqlens=[1024, 2048], heads=[4], head_dims=[64], expansions=[2], chunk_sizes=[4, 16, 64],
           dtype="fp32", warmup_ms=25, rep_ms=100, host_reps=3)
QUICK = dict(batch=[1], seqlens=[256], heads=[2], head_dims=[32], expansions=[2], chunk_sizes=[16], warmup_ms=5,
             rep_ms=20, host_reps=2)


@dataclass(frozen=True)
class MLPShape(Shape):
    """A :class:`Shape` (B, T, H, K, V, chunk size) plus the MLP memory's hidden width Dh."""

    Dh: int


@dataclass
class Entry:
    """One row of the JSON output (Dh is the MLP width of the shape, also on the linear rows)."""

    provider: str
    mode: str
    B: int
    T: int
    H: int
    K: int
    V: int
    Dh: int
    chunk_size: int
    dtype: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    tokens_per_s: float | None
    peak_mem_mb: float | None
    error: str | None


# --------------------------------------------------------------------------------------------
# Inputs and provider calls
# --------------------------------------------------------------------------------------------

def make_gates(s: MLPShape, dtype, device, requires_grad: bool) -> list[torch.Tensor]:
    """Leaves alpha ~ 0.1 * U[0, 1] (forget), eta ~ U[0, 1] (momentum decay) and theta ~ 0.1 * U[0, 1]
    (step size), each ``[B, T, H]``."""
    return [(scale * torch.rand(s.B, s.T, s.H, device=device)).to(dtype).requires_grad_(requires_grad)
            for scale in (0.1, 1.0, 0.1)]


def make_weights(s: MLPShape, dtype, device, requires_grad: bool) -> list[torch.Tensor]:
    """The initial memory W1 ``[1, H, K, Dh]``, W2 ``[1, H, Dh, V]`` ~ N(0, 1 / fan_in), as leaves."""
    W1 = torch.randn(1, s.H, s.K, s.Dh, device=device) / math.sqrt(s.K)  # [1, H, K, Dh]
    W2 = torch.randn(1, s.H, s.Dh, s.V, device=device) / math.sqrt(s.Dh)  # [1, H, Dh, V]
    return [w.to(dtype).requires_grad_(requires_grad) for w in (W1, W2)]


def build_ours(s: MLPShape, dtype, device, requires_grad: bool, activation: str):
    """Forward closure of the MLP-memory op (Triton on CUDA, the PyTorch dual form elsewhere) and
    its leaf inputs."""
    from titans_layers.ops import chunk_mlp_memory, naive_chunk_mlp_memory
    op = chunk_mlp_memory if device.type == "cuda" else naive_chunk_mlp_memory
    q, k, v = make_qkv(s, dtype, device, requires_grad)  # [B, T, H, K], [B, T, H, K], [B, T, H, V]
    alpha, eta, theta = make_gates(s, dtype, device, requires_grad)  # [B, T, H] each
    W1, W2 = make_weights(s, dtype, device, requires_grad)

    def forward() -> torch.Tensor:
        o, _ = op(q, k, v, alpha, eta, theta, chunk_size=s.chunk_size, initial_state=(W1, W2),
                  activation=activation)  # [B, T, H, V]
        return o

    return forward, [q, k, v, alpha, eta, theta, W1, W2]


def build_linear(s: MLPShape, dtype, device, requires_grad: bool):
    """Forward closure of the linear op (Triton on CUDA, the PyTorch chunked form elsewhere) at the
    same q, k, v and gates with zero initial memory, and its leaf inputs."""
    from titans_layers.ops import chunk_momentum_delta_rule, naive_chunk_momentum_delta_rule
    op = chunk_momentum_delta_rule if device.type == "cuda" else naive_chunk_momentum_delta_rule
    q, k, v = make_qkv(s, dtype, device, requires_grad)
    alpha, eta, theta = make_gates(s, dtype, device, requires_grad)

    def forward() -> torch.Tensor:
        o, _ = op(q, k, v, alpha, eta, theta, chunk_size=s.chunk_size)  # [B, T, H, V]
        return o

    return forward, [q, k, v, alpha, eta, theta]


def titans_pytorch_memory(s: MLPShape) -> torch.nn.Module:
    """titans-pytorch's ``NeuralMemory`` reduced to its store and retrieve (module docstring):
    identity projections, no retrieve gate, no norms; input and output ``[B, T, H * K]``."""
    from titans_pytorch import MemoryMLP, NeuralMemory

    if s.K != s.V:
        raise ValueError(f"titans-pytorch's memory maps dim_head to itself: needs K == V, got {s.K}, {s.V}")
    memory = NeuralMemory(s.H * s.K, chunk_size=s.chunk_size, dim_head=s.K, heads=s.H,
                          model=MemoryMLP(s.K, depth=2, expansion_factor=s.Dh / s.K),
                          pre_rmsnorm=False, mem_model_norm_add_residual=False)
    for name in ("to_queries", "to_keys", "to_values", "combine_heads"):
        setattr(memory, name, torch.nn.Identity())
    memory.retrieve_gate = None
    return memory


def build_titans_pytorch(s: MLPShape, dtype, device, requires_grad: bool):
    """Forward closure of titans-pytorch's memory on x ``[B, T, H * K]`` (output viewed as
    ``[B, T, H, V]``) and its leaves: x and, in forward + backward mode, its parameters."""
    memory = titans_pytorch_memory(s).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    x = torch.randn(s.B, s.T, s.H * s.K, device=device, dtype=dtype).requires_grad_(requires_grad)  # [B, T, D]

    def forward() -> torch.Tensor:
        retrieved, _ = memory(x)  # [B, T, H * V]
        return retrieved.view(s.B, s.T, s.H, s.V)

    return forward, [x, *memory.parameters()]


def builder(provider: str, activation: str) -> Callable:
    """``(shape, dtype, device, requires_grad) -> (forward, leaves)`` of ``provider``; fla's is the
    one ``benchmark_momentum_delta_rule`` uses."""
    if provider == OURS:
        return functools.partial(build_ours, activation=activation)
    return {LINEAR: build_linear, FLA_GATED: build_fla_gated, TITANS_PYTORCH: build_titans_pytorch}[provider]


def skip_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run here (None when it can)."""
    if provider == TITANS_PYTORCH:
        return common.not_installed("titans_pytorch", "titans-pytorch")
    return common.fla_skip_reason(device) if provider == FLA_GATED else None


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def run_entry(provider: str, mode: str, s: MLPShape, args, device, launch: str = "default") -> Entry:
    """Measure one (provider, mode, shape) on fresh inputs (``common.measure_fresh``); ours under the
    launch setting ``launch`` (``--launches``)."""
    from titans_layers.ops.mlp_memory.chunk import override_mlp_launch

    build = functools.partial(build_timed, builder(provider, args.activation), s, mode, common.DTYPES[args.dtype],
                              device)
    m = common.measure_fresh(build, device, args, backward=(mode == "fwdbwd"),
                             context=override_mlp_launch(**parse_launch(launch)))
    return Entry(launch_provider(provider, launch), mode, s.B, s.T, s.H, s.K, s.V, s.Dh, s.chunk_size, args.dtype,
                 m.median_ms, m.p20_ms, m.p80_ms, m.tokens_per_s(s.B * s.T), m.peak_mem_mb, m.error)


def parse_launch(launch: str) -> dict[str, int]:
    """``"BT=16,fwd_warps=4"`` -> ``{"BT": 16, "fwd_warps": 4}``; ``"default"`` -> ``{}``."""
    if launch == "default":
        return {}
    fields = {}
    for item in launch.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--launches: expected 'default' or field=int pairs, got {launch!r}")
        fields[name.strip()] = int(value)
    return fields


def launch_provider(provider: str, launch: str) -> str:
    """The provider name of ours under a launch setting: ``mlp_memory[BT=16]`` (or the plain name)."""
    return provider if provider != OURS or launch == "default" else f"{OURS}[{launch}]"


def shapes(args) -> list[MLPShape]:
    """All (B, H, head dim, expansion, chunk size, T) combinations, T varying fastest."""
    return [MLPShape(B, T, H, d, d, C, e * d) for B, H, d, e, C, T in
            itertools.product(args.batch, args.heads, args.head_dims, args.expansions, args.chunk_sizes, args.seqlens)]


def format_entry(e: Entry) -> str:
    """One progress line."""
    head = f"[{e.provider:>26}] {e.mode:<6} B={e.B} T={e.T:<6} H={e.H} K={e.K} Dh={e.Dh} C={e.chunk_size}"
    if e.error:
        return f"{head}: {e.error}"
    return (f"{head}: {e.median_ms:.3f} ms (p20 {e.p20_ms:.3f}, p80 {e.p80_ms:.3f}), "
            f"{e.tokens_per_s / 1e3:.1f} K tok/s{common.peak_note(e.peak_mem_mb)}")


def run(args, device) -> tuple[list[Entry], dict[str, str]]:
    """Measure every provider x mode x shape that can run here, ours once per launch setting.
    Returns (entries, skipped providers)."""
    active, skipped = common.active_providers(args.providers, skip_reason, device)
    variants = [(provider, launch) for provider in active
                for launch in (args.launches if provider == OURS else ["default"])]

    def run_one(variant: tuple[str, str], mode: str, s: MLPShape) -> Entry:
        provider, launch = variant
        return run_entry(provider, mode, s, args, device, launch)

    return common.sweep(shapes(args), args.modes, variants, run_one, format_entry), skipped


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def timing_note(env: dict, args) -> str:
    """How the times were taken, and what the ratio columns mean."""
    how = ("triton do_bench" if env["device_type"] == "cuda" else
           f"{args.host_reps} perf_counter-timed calls after one warm-up; torch CPU threads: {env['cpu_threads']}")
    return (f"Median ms ({how}); activation of ours: {args.activation}. Ratio columns: mlp / linear and "
            "mlp / gated_delta above 1 mean the MLP memory is slower; titans-pytorch / mlp above 1 means "
            "ours is faster.")


def memory_heading(env: dict) -> str:
    """What the peak-memory tables show on this device (``common.peak_memory_mb``)."""
    if env["device_type"] == "cuda":
        return "Peak allocated memory (MiB, inputs included):"
    return ("Peak resident set size increase during one call (MiB; inputs excluded, allocator slack "
            "included; `-`: not measurable here):")


def mode_section(mode: str, rows: list[dict], env: dict, args) -> list[str]:
    """The time table of one mode, then its peak-memory table."""
    columns, ratios = common.provider_columns(args.providers, LABELS, RATIOS)
    if OURS in args.providers:  # a column per other launch setting, with its ratios to ours and to fla
        variants = [launch_provider(OURS, launch) for launch in args.launches if launch != "default"]
        columns += [(v, v) for v in variants]
        ratios += [(v, OURS, f"{v} / mlp") for v in variants]
        ratios += [(v, FLA_GATED, f"{v} / gated_delta") for v in variants if FLA_GATED in args.providers]
    return [f"## {common.MODE_TITLES[mode]}", "", "Median ms:", "",
            common.comparison_table(rows, row_keys=ROW_KEYS, columns=columns, ratios=ratios), "",
            memory_heading(env), "",
            common.comparison_table(rows, row_keys=ROW_KEYS, columns=columns, ratios=ratios,
                                    value_key="peak_mem_mb"), ""]


def markdown_report(entries: list[Entry], skipped: dict[str, str], env: dict, args) -> str:
    """Environment, then per mode a table of median ms and one of peak memory."""
    return common.mode_report(f"# MLP-memory op vs the linear op, fla and titans-pytorch ({args.dtype}, {args.device})",
                              env, [timing_note(env, args)], entries, args.modes,
                              functools.partial(mode_section, env=env, args=args), skipped,
                              lambda e: f"{e['provider']} {e['mode']} T={e['T']} H={e['H']} K={e['K']} "
                                        f"Dh={e['Dh']} C={e['chunk_size']}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line and pick the device; sizes and dtype not given come from ``--quick``,
    or from the CUDA or the CPU defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=common.int_list,
                   help=f"comma-separated batch sizes B (default {FULL['batch']}); our kernels run one program "
                        f"per sequence and head, so B * H against the SM count decides how full the GPU is")
    p.add_argument("--seqlens", type=common.int_list,
                   help=f"comma-separated lengths T (default CUDA {FULL['seqlens']}, CPU {CPU['seqlens']})")
    p.add_argument("--heads", type=common.int_list,
                   help=f"comma-separated head counts H (default CUDA {FULL['heads']}, CPU {CPU['heads']})")
    p.add_argument("--head-dims", type=common.int_list,
                   help=f"comma-separated head dims, K = V (default {FULL['head_dims']})")
    p.add_argument("--expansions", type=common.int_list,
                   help=f"comma-separated MLP expansions, Dh = expansion * K "
                        f"(default CUDA {FULL['expansions']}, CPU {CPU['expansions']})")
    p.add_argument("--chunk-sizes", type=common.int_list,
                   help=f"comma-separated chunk sizes, used by every provider (CUDA kernels: 16, 32, 64) "
                        f"(default CUDA {FULL['chunk_sizes']}, CPU {CPU['chunk_sizes']})")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), help="dtype of every input (default CUDA bf16, CPU fp32)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="silu",
                   help="our MLP memory's activation (default silu; titans-pytorch's MLP uses gelu)")
    common.add_mode_and_provider_args(p, PROVIDERS)
    p.add_argument("--launches", type=lambda text: [x.strip() for x in text.split(";") if x.strip()],
                   default=["default"],
                   help="';'-separated launch settings of our Triton kernels to compare, each 'default' or "
                        "field=int pairs such as 'BT=16,fwd_warps=4' (module docstring; CUDA only)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads; default torch's own)")
    common.add_timing_and_output_args(p, dict(FULL, host_reps=CPU["host_reps"]))  # --host-reps: used off CUDA
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke-test config {QUICK} (seconds on CPU); explicit flags still win")
    args = p.parse_args(argv)
    args.device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    defaults = FULL if args.device == "cuda" else CPU
    common.apply_preset(args, QUICK if args.quick else defaults)
    for launch in args.launches:
        parse_launch(launch)  # a malformed setting fails here, not after the first measurements
    if args.launches != ["default"] and args.device != "cuda":
        p.error("--launches sets the Triton kernels' launch, which runs on CUDA only")
    return common.apply_preset(args, dict(dtype=defaults["dtype"]))


def main(argv=None) -> None:
    """Run the benchmark the command line ``argv`` asks for and write its results."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = common.start_run(device, args, args.dtype)
    env["cpu_threads"] = torch.get_num_threads()
    entries, skipped = run(args, device)
    report = markdown_report(entries, skipped, env, args)
    common.save_run("ops_mlp_memory", args, env, entries, skipped, report)


if __name__ == "__main__":
    main()
