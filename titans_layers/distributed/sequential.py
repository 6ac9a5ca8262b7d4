"""State passing in sequence: rank r waits for the state its predecessor hands on, runs, and hands
its own on; the backward runs in the reverse order. Exact for any memory (and for anything whose
slices are chained by a state, e.g. MAC blocks), but it serialises: rank r starts when rank r - 1
has finished, so the wall time of the chained computation is that of one process over the whole
sequence. Communication per rank: one state received and one sent (forward), and their gradients
(backward)."""

from __future__ import annotations

import torch

from titans_layers.distributed.comm import recv_tensors, send_tensors
from titans_layers.distributed.context import CPContext
from titans_layers.distributed.graph import any_requires_grad, detached_leaves, grad_of


class _Stage(torch.autograd.Function):
    @staticmethod
    def forward(fctx, spec, *tensors):
        cp: CPContext = spec["cp"]
        needs = spec["needs_grad"]
        incoming = None
        if cp.continues_left:
            incoming = recv_tensors(spec["templates"], cp.rank - 1, cp.group)
            if needs:
                incoming = [t.requires_grad_(True) for t in incoming]
        leaves = detached_leaves(tensors) if needs else list(tensors)
        with torch.set_grad_enabled(needs):
            outputs, outgoing = spec["fn"](incoming, *leaves)
        outputs, outgoing = list(outputs), list(outgoing) if outgoing is not None else []
        if cp.continues_right:
            send_tensors(outgoing, cp.rank + 1, cp.group)
        if needs:
            fctx.graph = (outputs, outgoing, leaves, incoming)
        fctx.spec = spec
        fctx.out_templates = [torch.zeros_like(t) for t in outgoing] if cp.continues_right else []
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)

    @staticmethod
    def backward(fctx, *grads):
        cp: CPContext = fctx.spec["cp"]
        outputs, outgoing, leaves, incoming = fctx.graph
        del fctx.graph
        g_out = recv_tensors(fctx.out_templates, cp.rank + 1, cp.group) if cp.continues_right else []
        targets = list(leaves) + (list(incoming) if incoming is not None else [])
        got = grad_of(outputs + outgoing, targets, list(grads) + g_out, retain_graph=False)
        if cp.continues_left:
            d_in = [g if g is not None else torch.zeros_like(t) for g, t in zip(got[len(leaves):], incoming)]
            send_tensors(d_in, cp.rank - 1, cp.group)
        return (None, *got[:len(leaves)])


def sequential_stage(fn, cp: CPContext, templates, *tensors):
    """Run ``fn`` on this rank's slice after the previous rank, chaining a state across the ranks.

    Args:
        fn: ``fn(incoming, *tensors) -> (outputs, outgoing)``: ``incoming`` is the list of state
            tensors the previous rank sent (None when this rank's first sequence began here, i.e.
            ``not cp.continues_left``); ``outputs`` a sequence of tensors; ``outgoing`` the list of
            state tensors for the next rank (sent only when ``cp.continues_right``). ``fn`` must not
            communicate (the ranks run it one after another).
        cp: the context.
        templates: tensors shaped like what the previous rank's ``fn`` returns as ``outgoing``.
        tensors: ``fn``'s inputs; gradients flow to them.

    Returns:
        ``fn``'s outputs (a tuple), differentiable; the backward receives the gradient of
        ``outgoing`` from the next rank and sends that of ``incoming`` to the previous one.
    """
    spec = dict(fn=fn, cp=cp, templates=list(templates), needs_grad=any_requires_grad(tensors))
    return _Stage.apply(spec, *tensors)


class _RecvPrevious(torch.autograd.Function):
    @staticmethod
    def forward(fctx, anchor, cp, templates):
        fctx.cp, fctx.templates = cp, templates
        fctx.anchor_shape, fctx.anchor_dtype = anchor.shape, anchor.dtype
        return tuple(recv_tensors(templates, cp.rank - 1, cp.group))

    @staticmethod
    def backward(fctx, *grads):
        send_tensors([g if g is not None else torch.zeros_like(t) for g, t in zip(grads, fctx.templates)],
                     fctx.cp.rank - 1, fctx.cp.group)
        return torch.zeros(fctx.anchor_shape, dtype=fctx.anchor_dtype), None, None


class _SendNext(torch.autograd.Function):
    @staticmethod
    def forward(fctx, out, cp, *outgoing):
        fctx.cp = cp
        fctx.templates = [torch.zeros_like(t) for t in outgoing]
        send_tensors(outgoing, cp.rank + 1, cp.group)
        return out.view_as(out)

    @staticmethod
    def backward(fctx, grad):
        return (grad, None, *recv_tensors(fctx.templates, fctx.cp.rank + 1, fctx.cp.group))


def receive_state(cp: CPContext, templates, needs_grad: bool) -> list[torch.Tensor] | None:
    """The state the previous rank hands on (:func:`hand_on_state`), shaped like ``templates``;
    None when this rank's first sequence begins here. With ``needs_grad`` the received tensors
    require grad, and the backward sends their gradient back to the previous rank.

    ``needs_grad`` must be the same on both ranks of a pair (e.g. grad mode on and the chained
    module has trainable parameters): the previous rank waits for the gradient when it is set."""
    if not cp.continues_left:
        return None
    if needs_grad:
        anchor = torch.zeros((), requires_grad=True)  # ties the backward to this rank's graph
        return list(_RecvPrevious.apply(anchor, cp, list(templates)))
    return recv_tensors(templates, cp.rank - 1, cp.group)


def hand_on_state(out: torch.Tensor, cp: CPContext, outgoing, needs_grad: bool) -> torch.Tensor:
    """Send ``outgoing`` (this rank's state at its right edge) to the next rank and return ``out``
    unchanged; with ``needs_grad`` (as given to the next rank's :func:`receive_state`; ``out`` must
    then require grad) its backward first receives the state's gradient from the next rank. Ranks
    whose last sequence ends here send nothing. Together with :func:`receive_state` this chains any
    module across ranks with ordinary autograd (parameters included); the chained computation runs
    one rank after another, forward and backward."""
    if not cp.continues_right:
        return out
    if needs_grad:
        if not out.requires_grad:
            raise ValueError("hand_on_state(needs_grad=True) needs an `out` that requires grad: the next rank "
                             "sends the state's gradient back through its backward")
        return _SendNext.apply(out, cp, *outgoing)
    send_tensors(outgoing, cp.rank + 1, cp.group)
    return out
