"""Shared helpers for the benchmark scripts: environment capture, timing, JSON and Markdown output.

A benchmark script typically

1. parses its command line with :func:`add_mode_and_provider_args`, :func:`add_timing_and_output_args`
   and :func:`apply_preset`, and starts with :func:`start_run` (environment, first line);
2. runs every point x mode x provider with :func:`sweep`, each entry on fresh inputs with
   :func:`measure_fresh`: seeded, built, timed with :func:`measure`, released and
   :func:`free_memory` called; it never raises (errors such as out-of-memory come back as
   ``Measurement.error``);
3. writes its results with :func:`save_run`: the JSON of :func:`write_json` and a Markdown report
   assembled by :func:`mode_report` from :func:`comparison_table` tables.

Timing uses ``triton.testing.do_bench`` on CUDA (median / p20 / p80 over many runs, L2 cache
flushed between runs) and a plain ``time.perf_counter`` loop elsewhere, e.g. on CPU under
``TRITON_INTERPRET=1``, where the numbers only show that the script runs, not how fast anything is.
Peak memory is the peak allocated CUDA memory on CUDA and, on Linux CPUs, the peak resident set
size increase during one call (:func:`cpu_peak_memory_mb`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import gc
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence, TypeVar

import torch

from titans_layers.ops.common.triton_utils import is_interpreting

# Quantiles asked from do_bench, in the order its answer comes back.
QUANTILES = (0.5, 0.2, 0.8)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# What each entry times: the forward alone, or forward then backward; and their report headings.
MODES = ("fwd", "fwdbwd")
MODE_TITLES = {"fwd": "Forward", "fwdbwd": "Forward + backward"}

EntryT = TypeVar("EntryT")  # a script's result entry


# --------------------------------------------------------------------------------------------
# Device and environment
# --------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_name() -> str:
    """A human-readable CPU model name (``/proc/cpuinfo`` where available)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """E.g. ``"NVIDIA H100 80GB HBM3"``, or the CPU model (with ``" (TRITON_INTERPRET)"`` when
    Triton runs under its interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name() + (" (TRITON_INTERPRET)" if is_interpreting() else "")


def device_slug(device: torch.device) -> str:
    """A file-name-safe short name: ``"nvidia-h100-80gb-hbm3"``, ``"cpu-interpret"`` or ``"cpu"``."""
    if device.type != "cuda":
        return "cpu-interpret" if is_interpreting() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def timestamp() -> str:
    """Local time as ``YYYYmmdd-HHMMSS``, for file names."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _dist_version(*dists: str) -> str | None:
    """Version of the first installed distribution among ``dists`` (None when none is)."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _module_version(module: str) -> str | None:
    """``module.__version__`` (imports the module; None when it cannot be imported)."""
    try:
        return getattr(importlib.import_module(module), "__version__", None)
    except Exception:  # noqa: BLE001 - a broken optional package must not stop the benchmark
        return None


def _git_commit(repo_dir: Path) -> str | None:
    """HEAD of the git checkout at ``repo_dir`` (read-only; None outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def collect_environment(device: torch.device, extra_versions: Mapping[str, str | None] | None = None) -> dict:
    """Everything needed to tell two result files apart: device, library versions, date.

    Args:
        device: the device the benchmark runs on.
        extra_versions: more ``{name: version}`` entries to record (e.g. from :func:`package_versions`).

    Returns:
        A JSON-serialisable dict.
    """
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "triton_interpret": is_interpreting(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(Path(__file__).resolve().parent.parent),
        "versions": {
            "torch": torch.__version__,
            "triton": _dist_version("triton") or _module_version("triton"),
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "total_memory_gb": round(props.total_memory / 2**30, 1),
        }
    if extra_versions:
        env["versions"].update(extra_versions)
    return env


def package_versions() -> dict[str, str | None]:
    """Versions of fla (both distributions), titans-pytorch and ``titans_layers``, without importing
    fla (whose import warns on machines without a GPU)."""
    return {
        "flash-linear-attention": _dist_version("flash-linear-attention"),
        "fla-core": _dist_version("fla-core"),
        "titans-pytorch": _dist_version("titans-pytorch"),
        "titans_layers": _module_version("titans_layers"),
    }


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    """One timed closure: quantiles of its run time (ms), its peak memory (MiB; see
    :func:`peak_memory_mb`, None where it cannot be measured), or the error that stopped it (then the
    numbers are None)."""

    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mem_mb: float | None = None
    error: str | None = None

    def tokens_per_s(self, tokens: int) -> float | None:
        """Throughput of a call that processes ``tokens`` tokens: ``tokens / median`` per second
        (None without a median)."""
        return tokens / (self.median_ms / 1e3) if self.median_ms else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop unreachable tensors and, on CUDA, return cached blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for x in tensors:
        x.grad = None


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending, non-empty sequence."""
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _bench_host(fn: Callable[[], Any], device: torch.device, reps: int,
                grad_to_none: Sequence[torch.Tensor]) -> list[float]:
    """``[median, p20, p80]`` ms of ``reps`` timed calls with ``time.perf_counter`` (no warm-up here)."""
    times = []
    for _ in range(max(1, reps)):
        _clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return [_quantile(times, q) for q in QUANTILES]


def bench_ms(fn: Callable[[], Any], device: torch.device, *, warmup_ms: int = 25, rep_ms: int = 100,
             host_reps: int = 3, grad_to_none: Sequence[torch.Tensor] = ()) -> list[float]:
    """``[median, p20, p80]`` run time of ``fn`` in ms.

    On CUDA this is ``triton.testing.do_bench(fn, warmup_ms, rep_ms, grad_to_none, quantiles)``:
    runs repeat for about ``rep_ms`` after ``warmup_ms`` of warm-up, with the L2 cache flushed and the
    ``.grad`` of ``grad_to_none`` reset before each. Elsewhere it is a ``time.perf_counter`` loop of
    ``host_reps`` calls (the caller has already warmed ``fn`` up).
    """
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none),
                                            quantiles=list(QUANTILES)))
    return _bench_host(fn, device, host_reps, grad_to_none)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None where the C library has none, e.g. musl or off Linux)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status``, e.g. ``VmRSS`` or ``VmHWM``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's resident set high-water mark ``VmHWM`` to its current RSS (Linux >= 4.0:
    ``5`` written to ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """The extra host memory one call of ``fn`` needs: the peak increase (MiB) of this process's
    resident set size during the call over its RSS right before it. Linux with glibc only.

    What is measured: ``VmHWM - VmRSS`` of ``/proc/self/status``, the high-water mark being reset to
    the current RSS right before the call. So that memory the process holds but does not use cannot
    be reused by the call without counting, glibc's ``malloc_trim(0)`` first returns freed heap pages
    (e.g. freed by an earlier call of ``fn``) to the OS, and Python's cyclic garbage collector is
    paused during the call (garbage from before it stays allocated and uncounted; a full collection
    instead would cost a large process a good part of a second).

    Excluded: everything alive before the call (inputs, parameters). Included: whatever the call
    allocates and writes (outputs, saved activations, gradients, temporaries), allocator slack
    (glibc's rounding and arena fragmentation) and pages of code or data first touched during the
    call. A freshly allocated page counts only once written.

    ``fn`` runs in this process: a forked child would re-fault the shared library pages it touches,
    and GNU OpenMP's thread pool (torch's intra-op pool) deadlocks in a child forked after using it.

    Returns None where this cannot be measured: off Linux, without a writable
    ``/proc/self/clear_refs`` (kernel < 4.0, some sandboxes) or without glibc's ``malloc_trim``.
    """
    if _MALLOC_TRIM is None:
        return None
    _MALLOC_TRIM(0)
    if not _reset_peak_rss():
        return None
    before = _proc_status_kib("VmRSS")
    collecting = gc.isenabled()
    gc.disable()
    try:
        fn()
    finally:
        if collecting:
            gc.enable()
    return (_proc_status_kib("VmHWM") - before) / 1024


def peak_memory_mb(fn: Callable[[], Any], device: torch.device,
                   grad_to_none: Sequence[torch.Tensor] = ()) -> float | None:
    """Peak memory (MiB) of one call of ``fn``, measured outside do_bench (whose cache-flush buffer
    would otherwise count), after resetting the ``.grad`` of ``grad_to_none``.

    On CUDA: the peak allocated CUDA memory during the call, counting everything allocated at the
    time (inputs included). Elsewhere: :func:`cpu_peak_memory_mb`, the peak RSS increase during the
    call (inputs excluded; None where it cannot be measured).
    """
    _clear_grads(grad_to_none)
    if device.type != "cuda":
        return cpu_peak_memory_mb(fn)
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"``, shortened to ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def measure(fn: Callable[[], Any], device: torch.device, *, warmup_ms: int = 25, rep_ms: int = 100,
            host_reps: int = 3, grad_to_none: Sequence[torch.Tensor] = ()) -> Measurement:
    """Warm up ``fn`` once (compilation), take its peak memory, then time it with :func:`bench_ms`.

    Never raises for errors inside ``fn`` (out of memory, unsupported shape, compilation failure):
    they are returned as ``Measurement(error=...)``. ``KeyboardInterrupt`` still stops the run.
    """
    try:
        fn()
        synchronize(device)
        peak = peak_memory_mb(fn, device, grad_to_none)
        median, p20, p80 = bench_ms(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms, host_reps=host_reps,
                                    grad_to_none=grad_to_none)
        return Measurement(median_ms=median, p20_ms=p20, p80_ms=p80, peak_mem_mb=peak)
    except Exception as exc:  # noqa: BLE001 - record and go on with the next entry
        return Measurement(error=describe_error(exc))
    finally:
        _clear_grads(grad_to_none)


def measure_fresh(build: Callable[[], tuple[Callable[[], Any], Sequence[torch.Tensor]]], device: torch.device,
                  timing: argparse.Namespace, *, backward: bool,
                  context: ContextManager | None = None) -> Measurement:
    """Measure one entry on fresh inputs: seed torch with 0, call ``build()`` for the timed closure
    and its leaf tensors, :func:`measure` the closure, then drop both and :func:`free_memory`.

    Args:
        build: returns ``(fn, leaves)``; whatever it allocates lives only as long as ``fn`` and
            ``leaves``, so it is released before the memory is freed.
        device: where ``fn`` runs.
        timing: the parsed command line, for its ``warmup_ms``, ``rep_ms`` and ``host_reps``.
        backward: ``fn`` runs a backward pass: the ``.grad`` of ``leaves`` is reset before each
            timed call (``leaves`` are not touched otherwise).
        context: a context manager held around building and timing (e.g. a kernel launch setting).

    Never raises for errors while entering ``context``, building or timing (e.g. out of memory
    while building the inputs): they come back as ``Measurement(error=...)``.
    """
    torch.manual_seed(0)
    try:
        with context if context is not None else contextlib.nullcontext():
            return _measure_built(build, device, timing, backward)
    except Exception as exc:  # noqa: BLE001 - e.g. OOM while building the inputs
        return Measurement(error=describe_error(exc))
    finally:
        free_memory(device)


def _measure_built(build: Callable[[], tuple[Callable[[], Any], Sequence[torch.Tensor]]], device: torch.device,
                   timing: argparse.Namespace, backward: bool) -> Measurement:
    """:func:`measure` the closure ``build()`` returns; the inputs go with this frame."""
    fn, leaves = build()
    return measure(fn, device, warmup_ms=timing.warmup_ms, rep_ms=timing.rep_ms, host_reps=timing.host_reps,
                   grad_to_none=leaves if backward else ())


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def result_paths(out_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """``(<out_dir>/<stem>.json, <out_dir>/<stem>.md)``, creating ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{stem}.json", out / f"{stem}.md"


def _jsonable(x: Any) -> Any:
    """Dataclasses to dicts, non-finite floats to None, anything else unknown to ``str``."""
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def write_json(path: str | os.PathLike, *, environment: Mapping, args: Mapping, entries: Sequence,
               **extra: Any) -> Path:
    """Write ``{"environment", "args", **extra, "entries"}`` as indented JSON and return the path.

    ``entries`` may be dicts or dataclasses; ``args`` is typically ``vars(argparse_namespace)``.
    """
    payload = {"environment": environment, "args": args, **extra, "entries": entries}
    path = Path(path)
    path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align_right_from: int = 0) -> str:
    """A GitHub Markdown table; columns from ``align_right_from`` on are right-aligned."""
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    rule = ["---:" if i >= align_right_from else "---" for i in range(len(headers))]
    return "\n".join([line(headers), line(rule), *(line(r) for r in rows)])


def _short_error(error: str) -> str:
    return "OOM" if "OutOfMemory" in error or "out of memory" in error else "error"


def comparison_table(entries: Sequence[Mapping], *, row_keys: Sequence[str],
                     columns: Sequence[tuple[str, str]], ratios: Sequence[tuple[str, str, str]] = (),
                     column_key: str = "provider", value_key: str = "median_ms") -> str:
    """One row per distinct ``row_keys`` tuple (in first-seen order), one column per provider.

    Args:
        entries: result dicts (all of one mode, say) with ``row_keys``, ``column_key``,
            ``value_key`` and ``error``.
        row_keys: keys naming a row, shown as its first columns (e.g. ``("B", "T", "H", "K")``).
        columns: ``(provider, header)`` pairs; cells show ``value_key`` with 3 decimals, ``OOM`` /
            ``error`` for a failed entry, ``-`` where there is no entry.
        ratios: ``(numerator, denominator, header)`` provider pairs; cells show ``num / den`` as
            ``1.23x`` (above 1: the numerator is slower), ``-`` where either is missing.
    """
    cells: dict[tuple, dict[str, Mapping]] = {}
    for e in entries:
        cells.setdefault(tuple(e[k] for k in row_keys), {})[e[column_key]] = e

    def value(entry):
        if entry is None:
            return None, "-"
        if entry.get("error"):
            return None, _short_error(entry["error"])
        v = entry.get(value_key)
        return v, "-" if v is None else f"{v:.3f}"

    rows = []
    for key, by_provider in cells.items():
        row = list(key)
        row += [value(by_provider.get(p))[1] for p, _ in columns]
        for num, den, _ in ratios:
            a, b = value(by_provider.get(num))[0], value(by_provider.get(den))[0]
            row.append(f"{a / b:.2f}x" if a is not None and b else "-")
        rows.append(row)
    headers = [*row_keys, *(h for _, h in columns), *(h for _, _, h in ratios)]
    return markdown_table(headers, rows, align_right_from=len(row_keys))


def environment_markdown(env: Mapping) -> str:
    """A bullet list of the environment from :func:`collect_environment`."""
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v is not None)
    lines = [
        f"- device: {env.get('device')}" + (f" (sm {env['gpu']['capability']}, {env['gpu']['sm_count']} SMs, "
                                             f"{env['gpu']['total_memory_gb']} GiB)" if "gpu" in env else ""),
        f"- CUDA: {env.get('cuda')}; python {env.get('python')}",
        f"- versions: {versions}",
        f"- git commit: {env.get('git_commit')}",
        f"- date: {env.get('date')}",
    ]
    return "\n".join(lines)


def error_list(entries: Sequence[Mapping], describe: Callable[[Mapping], str]) -> str:
    """A bullet list ``- <describe(entry)>: <error>`` of the failed entries ('' when none)."""
    return "\n".join(f"- {describe(e)}: {e['error']}" for e in entries if e.get("error"))


def report_footer(entries: Sequence[Mapping], skipped: Mapping[str, str],
                  describe: Callable[[Mapping], str]) -> list[str]:
    """The closing Markdown lines of a report: the skipped providers with their reasons, then the
    failed entries (:func:`error_list`); empty when there are neither."""
    parts = []
    if skipped:
        parts += ["Skipped providers:", "", *(f"- {p}: {r}" for p, r in skipped.items()), ""]
    errors = error_list(entries, describe)
    if errors:
        parts += ["Errors:", "", errors, ""]
    return parts


def provider_columns(providers: Sequence[str], labels: Mapping[str, str], ratios: Sequence[tuple[str, str, str]]
                     ) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The ``columns`` and ``ratios`` of :func:`comparison_table` for the providers that were asked
    for: a column per provider under its label, and the ratios whose two providers are both there."""
    columns = [(p, labels[p]) for p in providers]
    return columns, [r for r in ratios if r[0] in providers and r[1] in providers]


def mode_report(title: str, env: Mapping, notes: Sequence[str], entries: Sequence, modes: Sequence[str],
                section: Callable[[str, list[dict]], list[str]], skipped: Mapping[str, str],
                describe: Callable[[Mapping], str]) -> str:
    """A benchmark's Markdown report: the title line, the environment (:func:`environment_markdown`),
    each of ``notes`` as a paragraph, then per mode the lines ``section(mode, rows of that mode)``
    (each entry as a dict), then :func:`report_footer`.

    Args:
        title: the heading, ``# `` included.
        entries: dataclass entries with a ``mode`` field.
        describe: names a failed entry (a dict) in the error list.
    """
    rows = [vars(e) for e in entries]
    parts = [title, "", environment_markdown(env), ""]
    for note in notes:
        parts += [note, ""]
    for mode in modes:
        parts += section(mode, [r for r in rows if r["mode"] == mode])
    parts += report_footer(rows, skipped, describe)
    return "\n".join(parts)


def peak_note(peak_mem_mb: float | None) -> str:
    """The peak-memory end of a progress line: ``", peak 12 MiB"``, or ``""`` when not measured."""
    return f", peak {peak_mem_mb:.0f} MiB" if peak_mem_mb is not None else ""


def command_line() -> str:
    """The command that started this process, for the record (``python -m pkg.mod ...`` when run
    as a module)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return " ".join(["python", *script, *sys.argv[1:]])


# --------------------------------------------------------------------------------------------
# Shared command-line and run plumbing of the benchmark scripts
# --------------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]`` (an argparse type)."""
    return [int(x) for x in text.split(",") if x.strip()]


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma-separated subset of ``choices``."""
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items or any(x not in choices for x in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def apply_preset(args: argparse.Namespace, preset: Mapping[str, Any]) -> argparse.Namespace:
    """Fill every argument left unset (None) from ``preset`` (``--quick`` or the full sweep)."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def add_mode_and_provider_args(p: argparse.ArgumentParser, providers: Sequence[str]) -> None:
    """Add ``--modes`` and ``--providers``: comma-separated subsets of :data:`MODES` and of
    ``providers``, all of them by default."""
    p.add_argument("--modes", type=choice_list(MODES), default=list(MODES),
                   help="comma-separated modes: fwd (forward only), fwdbwd (forward + backward) (default both)")
    p.add_argument("--providers", type=choice_list(providers), default=list(providers),
                   help=f"comma-separated providers to run (default {','.join(providers)})")


def add_timing_and_output_args(p: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Add ``--warmup-ms``, ``--rep-ms`` and ``--host-reps`` (None when not given, for
    :func:`apply_preset`; the help shows the values of ``defaults``) and ``--out``."""
    p.add_argument("--warmup-ms", type=int, help=f"do_bench warm-up time, ms (default {defaults['warmup_ms']})")
    p.add_argument("--rep-ms", type=int, help=f"do_bench repetition time, ms (default {defaults['rep_ms']})")
    p.add_argument("--host-reps", type=int,
                   help=f"timed calls per entry off CUDA, after one warm-up call (default {defaults['host_reps']})")
    p.add_argument("--out", default="benchmarks/results",
                   help="directory for the JSON and Markdown results (default benchmarks/results)")


def not_installed(module: str, name: str) -> str | None:
    """``"<name> is not installed"`` when ``module`` cannot be imported, else None."""
    return None if importlib.util.find_spec(module) else f"{name} is not installed"


def fla_skip_reason(device: torch.device, without_cuda: str = "fla's kernels need CUDA") -> str | None:
    """Why fla's ops and layers cannot run here: fla is not installed, or ``without_cuda`` off CUDA
    (None when they can)."""
    missing = not_installed("fla", "fla")
    if missing is not None:
        return missing
    return without_cuda if device.type != "cuda" else None


def active_providers(providers: Sequence[str], skip_reason: Callable[[str, torch.device], str | None],
                     device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Split ``providers`` into those that run here and ``{provider: why not}``, printing the skips."""
    skipped = {p: r for p in providers if (r := skip_reason(p, device)) is not None}
    for provider, reason in skipped.items():
        print(f"skipping {provider}: {reason}")
    return [p for p in providers if p not in skipped], skipped


def start_run(device: torch.device, args: argparse.Namespace, *details: str) -> dict:
    """The environment of a run (:func:`collect_environment` with :func:`package_versions`), after
    printing its first line ``device: <name>; <details>; modes [...]; providers [...]``."""
    env = collect_environment(device, package_versions())
    print("; ".join([f"device: {env['device']}", *details, f"modes {args.modes}", f"providers {args.providers}"]))
    return env


def sweep(points: Iterable[Any], modes: Sequence[str], providers: Sequence[Any],
          run_entry: Callable[[Any, str, Any], EntryT], describe: Callable[[EntryT], str]) -> list[EntryT]:
    """``run_entry(provider, mode, point)`` for every point, mode and provider (providers varying
    fastest, points slowest), printing ``describe(entry)`` after each; returns the entries."""
    entries = []
    for point, mode, provider in itertools.product(points, modes, providers):
        entries.append(run_entry(provider, mode, point))
        print(describe(entries[-1]), flush=True)
    return entries


def save_run(prefix: str, args: argparse.Namespace, env: Mapping, entries: Sequence, skipped: Mapping[str, str],
             report: str, **extra: Any) -> tuple[Path, Path]:
    """:func:`save_results` into ``args.out`` under the stem ``<prefix>_<device slug>_<timestamp>``,
    the JSON holding the skipped providers (``skipped_providers``) then ``extra``."""
    return save_results(args.out, f"{prefix}_{env['device_slug']}_{timestamp()}", environment=env, args=args,
                        entries=entries, report=report, skipped_providers=skipped, **extra)


def save_results(out_dir: str | os.PathLike, stem: str, *, environment: Mapping, args: argparse.Namespace,
                 entries: Sequence, report: str, **extra: Any) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (environment, arguments with the command line, ``extra``, entries) and
    ``<stem>.md`` (``report``), print the report and both paths; return the paths."""
    json_path, md_path = result_paths(out_dir, stem)
    write_json(json_path, environment=environment, args={**vars(args), "command": command_line()}, entries=entries,
               **extra)
    md_path.write_text(report)
    print()
    print(report)
    print(f"wrote {json_path}\nwrote {md_path}")
    return json_path, md_path
