"""Whether a call will be differentiated: decides what an op's forward keeps for its backward."""

from __future__ import annotations

import torch


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` from this call: grad mode is on
    and one of them requires grad.

    Decide this before ``autograd.Function.apply``: inside ``forward`` grad mode is always off,
    and ``ctx.needs_input_grad`` reflects only ``requires_grad``, so under ``torch.no_grad()`` with
    parameters that require grad (the usual inference setup) it would still say True."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
