"""Head parallelism for any memory: all-to-all from sequence shards to head shards, the ordinary op
over the whole packed batch for H / R heads on each rank, all-to-all back.

Exact (each head's update is independent of the others) and free of state passing; it needs H
divisible by R. Communication per rank per call: the inputs' ``(R - 1) / R`` share of
``n (2K + V + 3)`` values per head out and the same in, and ``n V`` per head for the output (both
directions again in the backward), so it grows with T, unlike the parallel state passing.
"""

from __future__ import annotations

import torch

from titans_layers.distributed.comm import all_gather_grad, all_to_all_grad
from titans_layers.distributed.context import CPContext
from titans_layers.distributed.families import Family, global_rows


def _to_heads(x: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """``[1, n, H, *]`` (this rank's tokens, all heads) -> ``[1, R n, H / R, *]`` (all tokens, this
    rank's heads)."""
    R = cp.world_size
    pieces = x.unflatten(2, (R, x.shape[2] // R)).movedim(2, 0)  # [R, 1, n, H / R, *], piece r -> rank r
    got = all_to_all_grad(pieces, cp.group)  # [R, 1, n, H / R, *], piece r from rank r (its tokens)
    return got.movedim(0, 1).flatten(1, 2)  # [1, R n, H / R, *]


def _to_tokens(y: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """The inverse of :func:`_to_heads`: ``[1, R n, H / R, *]`` -> ``[1, n, H, *]``."""
    R = cp.world_size
    pieces = y.unflatten(1, (R, y.shape[1] // R)).movedim(1, 0)  # [R, 1, n, H / R, *], tokens of rank r
    got = all_to_all_grad(pieces, cp.group)  # piece r: rank r's heads of our tokens
    return got.movedim(0, 2).flatten(2, 3)  # [1, n, H, *]


def head_parallel_update(op, family: Family, cp: CPContext, inputs, C: int, initial_state,
                         output_final_state: bool, op_kwargs):
    """See :func:`~titans_layers.distributed.context_parallel_update` with ``mode="heads"``."""
    q, v = inputs[0], inputs[2]
    H, R = q.shape[2], cp.world_size
    if H % R:
        raise ValueError(f"mode='heads' shards the H = {H} heads over the {R} ranks: H must be divisible by R")
    Hl = H // R
    N = len(cp.global_cu_seqlens) - 1
    fields, offsets = global_rows(family, initial_state, q, v, N, C)
    mine = slice(cp.rank * Hl, (cp.rank + 1) * Hl)
    state = family.make_state([f[:, mine] for f in fields], offsets, C)
    q, k, v, alpha, eta, theta = (_to_heads(x, cp) for x in inputs)
    cu = torch.tensor(cp.global_cu_seqlens, dtype=torch.int32, device=q.device)
    o, final = op(q, k, v, alpha, eta, theta, chunk_size=C, initial_state=state,
                  output_final_state=output_final_state, cu_seqlens=cu, **op_kwargs)
    o = _to_tokens(o, cp)  # [1, n, H, V]
    if not output_final_state:
        return o, None
    ids = torch.tensor(cp.seq_ids, device=q.device)
    weights = []
    for f in family.split_state(final):  # [N, H / R, ...] -> [N, H, ...], rows of the local sequences
        everyone = all_gather_grad(f.contiguous(), cp.group)  # [R, N, H / R, ...]
        weights.append(everyone.movedim(0, 1).flatten(1, 2)[ids])
    return o, family.make_state(weights, final.offset[ids], C)
