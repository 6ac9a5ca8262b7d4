"""A local autograd graph kept inside an ``autograd.Function``: the context-parallel paths run the
ordinary ops (references or kernels) on detached copies of their inputs, keep that graph, and in
their backward differentiate it with gradients that arrived from other ranks."""

from __future__ import annotations

import torch


def detached_leaves(tensors) -> list:
    """Detached copies that require grad where the originals are floating tensors needing it."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            leaf = t.detach()
            if t.requires_grad:
                leaf.requires_grad_(True)
            out.append(leaf)
        else:
            out.append(t)
    return out


def any_requires_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def grad_of(outputs, inputs, grad_outputs, retain_graph: bool) -> list:
    """``torch.autograd.grad`` over the outputs that are in the graph, zeros for unused inputs and
    None for inputs that do not require grad. ``grad_outputs`` entries may be None (zero)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
    wanted = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    result = [None] * len(inputs)
    if not pairs or not wanted:
        for i in wanted:
            result[i] = torch.zeros_like(inputs[i])
        return result
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                retain_graph=retain_graph, allow_unused=True)
    for i, g in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result
