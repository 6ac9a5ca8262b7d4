"""``@traceable``: lets ``torch.compile`` trace a public memory-update op without a graph break."""

from __future__ import annotations

import functools

import torch

from titans_layers.ops.common.autocast import without_autocast


def traceable(family: str, impl: str):
    """Decorate the public op ``{impl}_{family}``: under ``torch.compile`` it runs as the custom op
    of :mod:`titans_layers.ops.library` (opaque to Dynamo, with a fake implementation for shapes);
    eager calls run the op itself, with autocast off
    (:func:`~titans_layers.ops.common.autocast.without_autocast`)."""

    def wrap(fn):
        fn_eager = without_autocast(fn)

        @functools.wraps(fn)
        def op(q, k, v, alpha, eta, theta, **kwargs):
            if torch.compiler.is_compiling():
                from titans_layers.ops.library import traceable_update
                return traceable_update(family, impl, q, k, v, alpha, eta, theta, **kwargs)
            return fn_eager(q, k, v, alpha, eta, theta, **kwargs)

        return op

    return wrap
