"""The left halo: the tokens just before this rank's slice that a causal window needs (the short
convolution's ``W - 1`` inputs, the sliding-window attention's ``W - 1`` keys and values), with
their gradients sent back to the ranks that own them."""

from __future__ import annotations

import torch

from titans_layers.distributed.comm import all_gather_grad
from titans_layers.distributed.context import CPContext


def left_halo(x: torch.Tensor, cp: CPContext, width: int) -> torch.Tensor:
    """The last ``h = min(width, cp.left_offset)`` tokens before this rank's slice that belong to
    its first sequence (0 when that sequence begins here), in order.

    Args:
        x: ``[1, n, *]`` this rank's tokens (every rank calls, with the same trailing shape).
        cp: the context.
        width: how many tokens a window looks back (``W - 1``), >= 0.

    Returns:
        ``[h, *]``, differentiable: the gradient goes back to the rank (or ranks, when slices are
        shorter than ``width``) that hold the tokens. Communication: one all-gather of each rank's
        last ``width`` tokens, ``R * width`` tokens received per rank (and an all-reduce of the
        same size in the backward), independent of T.
    """
    cp.check_local("x", x)
    n = cp.local_length
    if width <= 0:
        return x[0, :0]
    tail = x[0, max(0, n - width):]  # [min(n, width), *]
    if n < width:
        tail = torch.cat([tail.new_zeros(width - n, *tail.shape[1:]), tail])
    everyone = all_gather_grad(tail.contiguous(), cp.group)  # [R, width, *]
    h = min(width, cp.left_offset)
    positions = range(cp.start - h, cp.start)
    ranks = [p // n for p in positions]
    slots = [width - (cp.ends[j] - p) for j, p in zip(ranks, positions)]
    index_r = torch.tensor(ranks, dtype=torch.long, device=x.device)
    index_t = torch.tensor(slots, dtype=torch.long, device=x.device)
    return everyone[index_r, index_t]  # [h, *]


def right_aligned(halo: torch.Tensor, width: int) -> torch.Tensor:
    """``[h, *]`` -> ``[width, *]`` with zeros in front (a cache row: history right-aligned)."""
    return torch.cat([halo.new_zeros(width - halo.shape[0], *halo.shape[1:]), halo])
