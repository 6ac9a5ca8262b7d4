"""``@without_autocast``: an op keeps its own precision inside a model run under ``torch.autocast``."""

from __future__ import annotations

import functools

import torch


def without_autocast(fn):
    """Run the op ``fn(q, ...)`` with autocast off on q's device: its precision is its own (SPEC §1,
    promise 5: state and accumulation in float32, outputs in the input dtype). Under autocast the
    PyTorch paths' float32 state matmuls would otherwise drop to bfloat16 or clash in dtype."""

    @functools.wraps(fn)
    def op(q, *args, **kwargs):
        if not isinstance(q, torch.Tensor):  # malformed: the op raises its own error
            return fn(q, *args, **kwargs)
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)

    return op
