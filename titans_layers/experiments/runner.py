"""Running an experiment: the grid of runs (models x ``--set`` values), widths matched per grid
point, each run trained, evaluated and measured (gate statistics), one process per run slot.

A run is a :class:`RunSpec`; :func:`run_one` turns it into a plain dict (the ``runs`` entries of
``results.json``). :func:`run_all` runs a list of them, ``jobs`` at a time in worker processes
(each with ``threads`` intra-op threads), and stops cleanly on Ctrl-C: the runs in flight end
their training where they are (marked ``interrupted``) and are still evaluated, the runs not
started are dropped, and the report is written from what finished.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import signal
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import torch

from titans_layers.experiments.models import (CONFIG_KEYS, MEMORY_OPTIONS, build_model, count_params,
                                              matched_width, memory_layers, skip_reason)
from titans_layers.experiments.tasks import TASKS, make_task
from titans_layers.experiments.training import TRAIN_KEYS, TrainConfig, train

GATE_STAT_EXAMPLES = 8


@dataclass
class RunSpec:
    """One run: a model, its options (``--set`` grid point), the task and training settings."""

    model: str
    task: str
    task_options: dict
    model_options: dict
    train: dict
    device: str
    hidden_size: int
    reference_params: int
    eval_options: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)


def split_overrides(overrides: dict, task: str) -> tuple[dict, dict, dict]:
    """Sort ``--set`` keys into (task options, model options, training options); unknown keys raise
    naming ``--set``."""
    task_fields = set(TASKS[task].__dataclass_fields__) - {"_data"}
    t, m, tr = {}, {}, {}
    for k, v in overrides.items():
        if k in task_fields:
            t[k] = v
        elif k in TRAIN_KEYS:
            tr[k] = v
        elif k in CONFIG_KEYS or k in MEMORY_OPTIONS:
            m[k] = v
        else:
            raise ValueError(f"`--set`: unknown key {k!r}; keys are task options {sorted(task_fields)}, training "
                             f"options {list(TRAIN_KEYS)}, model options (TitansConfig fields) and memory options "
                             f"{list(MEMORY_OPTIONS)}")
    return t, m, tr


def grid(sets: dict[str, list]) -> list[dict]:
    """Every combination of the ``--set`` values, in order (``{}`` when nothing is swept)."""
    keys = list(sets)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sets[k] for k in keys))]


def plan(task: str, task_options: dict, models: list[str], sets: dict[str, list], train_options: dict,
         device: str, eval_options: dict, model_options: dict | None = None) -> tuple[list[RunSpec], list[dict]]:
    """The runs of an experiment and the models skipped on this device (``{"model", "reason"}``).

    Per grid point the first runnable model is the parameter reference and every other model gets
    the width that matches it best."""
    runnable = [m for m in models if skip_reason(m, device) is None]
    skipped = [{"model": m, "reason": skip_reason(m, device)} for m in models if m not in runnable]
    specs = []
    for point in grid(sets):
        t_over, m_over, tr_over = split_overrides(point, task)
        topts = {**task_options, **t_over}
        tsk = make_task(task, **topts)
        mopts = {**(model_options or {}), **m_over}
        max_len = max([topts.get("seq_len", tsk.seq_len)] + list(eval_options.get("lengths", [])))
        if not runnable:
            break
        ref = count_params(runnable[0], tsk.vocab, max_len, mopts.get("hidden_size", 64), mopts)
        for name in runnable:
            width = matched_width(name, tsk.vocab, max_len, ref, mopts) if name != runnable[0] \
                else mopts.get("hidden_size", 64)
            tr = {**train_options, **tr_over}
            TrainConfig(**tr)  # check early, before any run starts
            specs.append(RunSpec(name, task, topts, mopts, tr, device, width, ref, eval_options, point))
    return specs, skipped


def evaluate(spec: RunSpec, model, task, device) -> dict:
    from titans_layers.experiments import evaluation as ev
    seed = spec.train.get("seed", 0)
    eo = spec.eval_options
    if spec.task == "mqar":
        return ev.evaluate_mqar(model, task, device, seed, num_examples=eo.get("examples", 256),
                                loads=eo.get("loads"))
    if spec.task == "niah":
        return ev.evaluate_niah(model, task, device, seed, lengths=eo.get("lengths", [task.seq_len]),
                                depths=eo.get("depths", [0.0, 0.5, 1.0]), num_examples=eo.get("examples", 16))
    return ev.evaluate_lm(model, task, device, num_windows=eo.get("examples", 64))


_STOP = None  # the stop event of this process (set by Ctrl-C in the parent)


def _worker_init(stop_event, threads: int) -> None:
    global _STOP
    _STOP = stop_event
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into the stop event
    torch.set_num_threads(threads)


def run_one(spec: RunSpec, progress: bool = True, position: int = 0) -> dict:
    """Build, train, evaluate and measure one run -> its ``results.json`` entry."""
    from titans_layers.experiments.gate_stats import gate_statistics
    out = {"model": spec.model, "overrides": spec.overrides, "hidden_size": spec.hidden_size, "status": "ok"}
    if _STOP is not None and _STOP.is_set():
        return {**out, "status": "not run (interrupted)"}
    t0 = time.perf_counter()
    try:
        device = torch.device(spec.device)
        task = make_task(spec.task, **spec.task_options)
        cfg = TrainConfig(**spec.train)
        max_len = max([task.seq_len] + list(spec.eval_options.get("lengths", [])))
        built = build_model(spec.model, task.vocab, max_len, spec.model_options, spec.hidden_size, seed=cfg.seed)
        out.update(params=built.params, param_ratio=built.params / spec.reference_params,
                   config=built.config.to_diff_dict(), task=spec.task, task_options=spec.task_options,
                   train_config=cfg.as_dict(), model_options=spec.model_options)
        desc = spec.model + "".join(f" {k}={v}" for k, v in spec.overrides.items())
        res = train(built.model, task, cfg, device, desc=desc, progress=progress, position=position,
                    should_stop=(lambda: _STOP is not None and _STOP.is_set()))
        out["training"] = {k: v for k, v in res.__dict__.items() if k != "curve"}
        out["curve"] = res.curve
        if res.interrupted:
            out["status"] = "interrupted"
        elif res.diverged_at is not None:
            out["status"] = f"diverged (loss not finite at step {res.diverged_at})"
        out["metrics"] = evaluate(spec, built.model, task, device)
        if memory_layers(built.model) and spec.task in ("mqar", "niah"):
            b = task.sample(GATE_STAT_EXAMPLES, np.random.default_rng(cfg.seed + 7))
            out["gates"] = gate_statistics(built.model, torch.as_tensor(b.inputs, device=device), b.roles)
    except KeyboardInterrupt:
        out["status"] = "interrupted"
    except Exception as exc:  # a failed run is reported, the others go on
        out["status"] = f"failed: {type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    out["wall_s"] = time.perf_counter() - t0
    return out


def _run_in_worker(spec: RunSpec, progress: bool) -> dict:
    ident = mp.current_process()._identity
    return run_one(spec, progress=progress, position=(ident[0] - 1) if ident else 0)


def run_all(specs: list[RunSpec], jobs: int = 1, threads: int = 1, progress: bool = True) -> list[dict]:
    """Run ``specs`` (``jobs`` worker processes of ``threads`` threads; 1 job runs in this process).
    Ctrl-C stops cleanly (see the module docstring); results come back in ``specs`` order."""
    global _STOP
    ctx = mp.get_context("spawn")
    stop = ctx.Event() if jobs > 1 else _LocalEvent()
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C aborts at once
    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: no Ctrl-C handling
        pass
    results: list[dict | None] = [None] * len(specs)
    try:
        if jobs <= 1:
            _STOP = stop
            torch.set_num_threads(threads)
            for i, spec in enumerate(specs):
                results[i] = run_one(spec, progress=progress)
        else:
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                     initargs=(stop, threads)) as pool:
                futures = {pool.submit(_run_in_worker, spec, progress): i for i, spec in enumerate(specs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
    finally:
        _STOP = None
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass
    return [r for r in results if r is not None]


class _LocalEvent:
    """A flag with the ``Event`` interface for the in-process path."""

    def __init__(self):
        self.flag = False

    def set(self):
        self.flag = True

    def is_set(self) -> bool:
        return self.flag
