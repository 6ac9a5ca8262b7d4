"""The experiments' tasks: ``mqar`` (multi-query associative recall), ``niah`` (single-needle
retrieval) and ``lm`` (byte-level language modelling). Every generator is deterministic for a
``numpy.random.Generator`` state."""

from titans_layers.experiments.tasks.base import IGNORE, ROLE_NAMES, Batch
from titans_layers.experiments.tasks.lm import ByteLM
from titans_layers.experiments.tasks.mqar import MQAR
from titans_layers.experiments.tasks.niah import NIAH

TASKS = {"mqar": MQAR, "niah": NIAH, "lm": ByteLM}


def make_task(name: str, **kwargs):
    """The task ``name`` with its options (unknown options raise a ``ValueError`` naming them)."""
    if name not in TASKS:
        raise ValueError(f"`task` must be one of {tuple(TASKS)}, got {name!r}")
    cls = TASKS[name]
    fields = set(cls.__dataclass_fields__) - {"_data"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; it takes {sorted(fields)}")
    return cls(**kwargs)


__all__ = ["Batch", "ByteLM", "IGNORE", "MQAR", "NIAH", "ROLE_NAMES", "TASKS", "make_task"]
