"""``python -m titans_layers.experiments TASK [options]`` (console script ``titans-experiments``).

Trains every model asked for on the task, evaluates it, and writes the report into ``--out``
(``results.json``, ``report.md``, PNG plots); prints the results table and the report's path.
``--set key=v1,v2`` (repeatable) sweeps a task, model, memory or training option: the runs are the
product of all the values given. Bad options exit with status 2 and a message naming the option.
"""

from __future__ import annotations

import argparse
import re
import resource
import shlex
import sys
import time
from pathlib import Path

from titans_layers.experiments.models import BASE_CONFIG, MODEL_NAMES

DEFAULT_MODELS = {
    "mqar": "lmm,lmm-mlp,mac,mac-mlp,mag,mal,mac_mal,swa,attn,gated_deltanet,deltanet,mamba2",
    "niah": "lmm,mac,mag,mal,swa,attn,gated_deltanet,deltanet,mamba2",
    "lm": "lmm,mac,mag,mal,swa,attn,gated_deltanet,deltanet,mamba2",
}
# option flag of each task / training field, to name the flag in errors raised by the checks
FLAGS = {"seq_len": "--seq-len", "num_kv_pairs": "--num-kv-pairs", "vocab_size": "--vocab-size",
         "power_a": "--power-a", "steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed",
         "warmup": "--warmup", "weight_decay": "--weight-decay", "grad_clip": "--grad-clip",
         "target_accuracy": "--target-accuracy", "eval_every": "--eval-every", "value_len": "--value-len",
         "haystack": "--haystack", "text_file": "--text-file", "max_bytes": "--max-bytes",
         "hidden_size": "--hidden-size", "num_hidden_layers": "--layers", "num_heads": "--heads",
         "depth": "--depths", "num_keys": "--set", "pattern_len": "--set"}


def _int_at_least(low: int):
    """An argparse type: an int >= ``low``, else an error naming what was expected."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return v
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def _number_list(kind: type, low: float | None = None):
    """An argparse type: a non-empty comma-separated list of ``kind`` (int or float), each >= ``low``
    when given, else an error naming what was expected."""
    what = f"{'ints' if kind is int else 'numbers'}{'' if low is None else f' >= {low}'}"

    def parse(text: str) -> list:
        try:
            vals = [kind(t) for t in text.split(",") if t]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {what}, got {text!r}") from None
        if not vals or (low is not None and min(vals) < low):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {what}, got {text!r}")
        return vals
    return parse


_int_list, _float_list = _number_list(int, 1), _number_list(float)


def parse_value(text: str):
    """A ``--set`` value: int, float, bool (true/false), none, or the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _set_item(text: str) -> tuple[str, list]:
    key, sep, values = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not values:
        raise argparse.ArgumentTypeError(f"must be key=value[,value...], got {text!r}")
    return key, [parse_value(v) for v in values.split(",")]


def _models(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in MODEL_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown model(s) {bad or text!r}; choose from {', '.join(MODEL_NAMES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"lists a model twice: {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titans-experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("mqar", "niah", "lm"), help="the task")
    p.add_argument("--models", type=_models, default=None,
                   help=f"comma-separated models (default per task); from: {', '.join(MODEL_NAMES)}")
    g = p.add_argument_group("task")
    g.add_argument("--seq-len", type=_positive_int, default=None, help="training sequence length")
    g.add_argument("--num-kv-pairs", type=_positive_int, default=8, help="mqar: key-value pairs")
    g.add_argument("--vocab-size", type=_positive_int, default=None, help="mqar / niah: vocabulary")
    g.add_argument("--power-a", type=_positive_float, default=0.01, help="mqar: gap power law exponent, (0, 1]")
    g.add_argument("--filler", choices=("random", "zero"), default="random", help="mqar: filler tokens")
    g.add_argument("--eval-loads", type=_int_list, default=None,
                   help="mqar: pair counts to evaluate at (default half, same, double the training load where "
                        "they fit)")
    g.add_argument("--value-len", type=_positive_int, default=4, help="niah: digits in the needle's value")
    g.add_argument("--haystack", choices=("pattern", "random"), default="pattern", help="niah: haystack")
    g.add_argument("--eval-lengths", type=_int_list, default=None,
                   help="niah: context lengths to evaluate (default 1x..64x the training length, up to 16384)")
    g.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="niah: needle depths")
    g.add_argument("--text-file", default=None, help="lm: a text file (default: the Python standard library)")
    g.add_argument("--max-bytes", type=_positive_int, default=4_000_000, help="lm: bytes of text to read")
    g.add_argument("--eval-examples", type=_positive_int, default=None, help="evaluation examples (or windows)")
    g = p.add_argument_group("model")
    g.add_argument("--hidden-size", type=_positive_int, default=BASE_CONFIG["hidden_size"],
                   help="width of the reference model (the first of --models); the others are matched to its "
                        "parameter count")
    g.add_argument("--layers", type=_positive_int, default=BASE_CONFIG["num_hidden_layers"], help="layers")
    g.add_argument("--heads", type=_positive_int, default=BASE_CONFIG["num_heads"], help="heads")
    g.add_argument("--set", dest="sets", type=_set_item, action="append", default=[], metavar="KEY=V1[,V2...]",
                   help="set or sweep an option (a TitansConfig field such as chunk_size, max_step_size or "
                        "max_update_norm; alpha_init / eta_init / theta_init; a training or task option); "
                        "repeatable, the runs are the product")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=500)
    g.add_argument("--batch-size", type=_positive_int, default=32)
    g.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate")
    g.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=_positive_float, default=1.0)
    g.add_argument("--seed", type=_non_negative_int, default=0)
    g.add_argument("--eval-every", type=_non_negative_int, default=100, help="validation period (0: at the end)")
    g.add_argument("--target-accuracy", type=_positive_float, default=None, help="stop early at this accuracy")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    g.add_argument("--jobs", type=_positive_int, default=1, help="runs in parallel (worker processes)")
    g.add_argument("--threads", type=_positive_int, default=1, help="torch threads per run")
    g.add_argument("--out", type=Path, default=None, help="report folder (default experiment_reports/TASK-TIME)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _flag_error(parser, exc: ValueError):
    """Exit with ``exc``'s message, naming the command-line option of the field it names."""
    msg = str(exc)
    m = re.search(r"`([A-Za-z_]+)`", msg)
    flag = FLAGS.get(m.group(1)) if m else None
    parser.error(f"argument {flag}: {msg}" if flag else msg)


def settings_from_args(args, parser) -> dict:
    """The experiment's settings from parsed arguments (checked; errors name the option)."""
    import torch

    from titans_layers.experiments.runner import plan
    from titans_layers.experiments.tasks import make_task
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"argument --device: {exc}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"argument --device: {device!r} asked for but CUDA is not available")
    task = args.task
    if task == "mqar":
        topts = dict(seq_len=args.seq_len or 128, num_kv_pairs=args.num_kv_pairs, vocab_size=args.vocab_size or 256,
                     power_a=args.power_a, random_filler=args.filler == "random")
    elif task == "niah":
        topts = dict(seq_len=args.seq_len or 256, vocab_size=args.vocab_size or 64, value_len=args.value_len,
                     haystack=args.haystack)
    else:
        topts = dict(seq_len=args.seq_len or 256, text_file=args.text_file, max_bytes=args.max_bytes)
    try:
        tsk = make_task(task, **topts)
    except ValueError as exc:
        _flag_error(parser, exc)
    eval_options = {}
    if task == "mqar":
        loads = args.eval_loads or [n for n in (tsk.num_kv_pairs // 2, tsk.num_kv_pairs, 2 * tsk.num_kv_pairs)
                                    if 1 <= n and 4 * n <= tsk.seq_len and n <= tsk.vocab_size // 2 - 1]
        for n in loads:
            if 4 * n > tsk.seq_len or n > tsk.vocab_size // 2 - 1:
                parser.error(f"argument --eval-loads: {n} pairs do not fit seq_len {tsk.seq_len} / vocab "
                             f"{tsk.vocab_size}")
        eval_options["loads"] = loads
        eval_options["examples"] = args.eval_examples or 256
    elif task == "niah":
        lengths = args.eval_lengths or sorted({min(16384, tsk.seq_len * f) for f in (1, 4, 16, 64)})
        if min(lengths) < 2 * (tsk.value_len + 2) + 1:
            parser.error(f"argument --eval-lengths: lengths must be at least {2 * (tsk.value_len + 2) + 1}")
        if any(not 0 <= d <= 1 for d in args.depths):
            parser.error(f"argument --depths: depths must be in [0, 1], got {args.depths}")
        eval_options.update(lengths=lengths, depths=args.depths, examples=args.eval_examples or 16)
    else:
        eval_options["examples"] = args.eval_examples or 64
    if not 0 <= args.warmup < 1:
        parser.error(f"argument --warmup: must be a fraction in [0, 1), got {args.warmup}")
    if args.target_accuracy is not None and args.target_accuracy > 1:
        parser.error(f"argument --target-accuracy: must be in (0, 1], got {args.target_accuracy}")
    train = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                 weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                 eval_every=args.eval_every, target_accuracy=args.target_accuracy)
    sets = {}
    for key, values in args.sets:
        if key in sets:
            parser.error(f"argument --set: {key!r} given twice")
        sets[key] = values
    models = args.models or DEFAULT_MODELS[task].split(",")
    model_options = dict(hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_heads=args.heads)
    try:
        specs, skipped = plan(task, topts, models, sets, train, device, eval_options, model_options)
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith("`--set`") or msg.startswith("`--models`"):
            parser.error("argument " + msg.replace("`", "", 2))
        named = re.search(r"`([A-Za-z_]+)`", msg)
        if named and named.group(1) in sets:  # a value given with --set
            parser.error(f"argument --set: {msg}")
        _flag_error(parser, exc)
    return dict(task=task, task_options=topts, train=train, device=device, specs=specs, skipped=skipped,
                eval_options=eval_options, sets=sets, models=models, model_options=model_options)


def notes_for(settings: dict, runs: list[dict]) -> list[str]:
    """The report's notes: how the baselines are built, what was matched."""
    notes = []
    models = settings["models"]
    window = next((r["config"].get("window_size", 256) for r in runs if r["model"] == "swa" and r.get("config")),
                  None)
    if "attn" in models:
        notes.append("`attn` (full causal attention) is a stack of `swa` blocks whose window covers the longest "
                     "sequence evaluated: a window >= the sequence length is exact causal attention.")
    if "swa" in models and window is not None:
        notes.append(f"`swa` is sliding-window attention only, window {window} tokens: it cannot see a pair "
                     f"farther than {window} tokens back.")
    if any(r["model"].startswith("mac") for r in runs):
        notes.append(f"MAC attends within segments of {settings['model_options'].get('segment_size', 32)} tokens "
                     "plus its persistent and retrieved tokens; MAG and MAL use the sliding window.")
    notes.append("Widths are matched to the first model's parameter count (within 10%; a miss is marked "
                 "with its ratio).")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args, parser)
    from titans_layers.experiments.plots import make_plots
    from titans_layers.experiments.reports import device_name, results_table, versions, write_report
    from titans_layers.experiments.runner import run_all
    out = args.out or Path("experiment_reports") / f"{settings['task']}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    specs = settings["specs"]
    print(f"{len(specs)} run(s) on {settings['device']}"
          + (f"; skipped: {', '.join(s['model'] for s in settings['skipped'])}" if settings["skipped"] else ""),
          file=sys.stderr)
    runs = run_all(specs, jobs=args.jobs, threads=args.threads, progress=not args.no_progress)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu_s = sum(u.ru_utime + u.ru_stime for u in usage)  # this process and its finished workers
    interrupted = len(runs) < len(specs) or any(r.get("status") != "ok" and "interrupted" in r.get("status", "")
                                                 for r in runs)
    runs = [r for r in runs if r.get("status") != "not run (interrupted)"]
    command = "titans-experiments " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    window = next((r["config"].get("window_size") for r in runs if r.get("config")
                   and "window_size" in r["config"]), 16)
    results = dict(task=settings["task"], task_options=settings["task_options"], train_options=settings["train"],
                   eval_options=settings["eval_options"], sets=settings["sets"], command=command,
                   device=f"{settings['device']}: {device_name(settings['device'])}", versions=versions(),
                   wall_s=time.perf_counter() - t0, cpu_s=cpu_s, jobs=args.jobs, interrupted=interrupted,
                   skipped=settings["skipped"],
                   window_size=window, notes=notes_for(settings, runs), runs=runs)
    plots = make_plots(results, out)
    results["plots"] = [Path(p).name for p in plots]
    jpath, mpath = write_report(results, out, plots)
    print(results_table(results))
    print(f"\nreport: {mpath}\nresults: {jpath}" + ("\n(interrupted: partial report)" if interrupted else ""))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
