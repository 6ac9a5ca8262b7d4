"""Collectives with gradients, on any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU).

Every function here is called by every rank of the group in the same order (forward and backward),
with tensors of the same shape on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_stack(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` ``[*s]`` from every rank -> ``[R, *s]`` (no gradient)."""
    R = dist.get_world_size(group)
    out = [torch.empty_like(x) for _ in range(R)]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.stack(out)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        return all_gather_stack(x, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's gradient of every piece, summed
        return grad[ctx.rank], None


def all_gather_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather: ``x`` ``[*s]`` -> ``[R, *s]``; the backward sums the gradients
    every rank gives piece r and returns them to rank r (one all-reduce of ``R * x.numel()``)."""
    return _AllGather.apply(x, group)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` ``[R, *s]``: piece r goes to rank r; returns ``[R, *s]`` with piece r from rank r."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def all_to_all_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-to-all over the leading dim ``[R, *s]`` (its own transpose: the backward
    sends each piece's gradient back the same way)."""
    return _AllToAll.apply(x, group)


def send_tensors(tensors, dst: int, group) -> None:
    """Blocking send of float tensors to ``dst`` (a group rank), one message each, in order."""
    glob = dist.get_global_rank(group, dst) if group is not None else dst
    for t in tensors:
        dist.send(t.detach().contiguous(), glob, group=group)


def recv_tensors(templates, src: int, group) -> list[torch.Tensor]:
    """Blocking receive of tensors shaped like ``templates`` from ``src`` (a group rank)."""
    glob = dist.get_global_rank(group, src) if group is not None else src
    out = []
    for t in templates:
        buf = torch.empty_like(t).contiguous()
        dist.recv(buf, glob, group=group)
        out.append(buf)
    return out
