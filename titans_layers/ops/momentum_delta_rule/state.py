"""The recurrent state of the linear-memory update, and how ``initial_state`` is read."""

from __future__ import annotations

from typing import NamedTuple

import torch

from titans_layers.ops.common.state_io import at_boundary, read_offset, read_weights
from titans_layers.ops.common.validation import OpShape


class MomentumDeltaRuleState(NamedTuple):
    """Everything needed to continue a linear-memory update exactly, also mid-chunk.

    Fields (``N`` rows: one per batch element, or per packed sequence with ``cu_seqlens``):

    - ``M``: ``[N, H, K, V]`` float32, the memory weights after the last token.
    - ``S``: ``[N, H, K, V]`` float32, the momentum ("surprise") after the last token.
    - ``anchor``: ``[N, H, K, V]`` float32, the weights at the start of the current chunk, where
      the remaining tokens of that chunk take their gradients. Equal to ``M`` when ``offset`` is 0.
    - ``offset``: ``[N]`` int64, tokens already processed in the current chunk, in ``[0, chunk_size)``.
    - ``chunk_size``: the chunk size the state was produced with. Continuing mid-chunk
      (``offset > 0``) with another chunk size is an error.

    As ``initial_state`` the plain tuples ``(M,)`` and ``(M, S)`` also work: they start at a chunk
    boundary, with zero momentum when ``S`` is absent. Weights with a leading dim of 1 are
    broadcast over the N rows (a learned initial memory); any other mismatch is an error.
    """

    M: torch.Tensor
    S: torch.Tensor
    anchor: torch.Tensor
    offset: torch.Tensor
    chunk_size: int


class ResolvedState(NamedTuple):
    """``initial_state`` as full float32 tensors (broadcast, still attached to autograd)."""

    M: torch.Tensor  # [N, H, K, V]
    S: torch.Tensor  # [N, H, K, V]
    anchor: torch.Tensor  # [N, H, K, V]
    offset: torch.Tensor  # [N] int64
    offsets: list[int]  # the same offsets on the host


def _weights(name: str, x, shape: OpShape, device, dtype) -> torch.Tensor:
    return read_weights(name, x, shape.N, (shape.H, shape.K, shape.V), "[N, H, K, V]", device, dtype)


def resolve_initial_state(initial_state, shape: OpShape, chunk_size: int, device,
                          dtype=torch.float32) -> ResolvedState:
    """Read ``initial_state`` (None, a tuple, or a :class:`MomentumDeltaRuleState`) into full tensors."""
    N, H, K, V = shape.N, shape.H, shape.K, shape.V
    if initial_state is None:
        M = torch.zeros(N, H, K, V, device=device, dtype=dtype)
        return ResolvedState(M, torch.zeros_like(M), M, torch.zeros(N, dtype=torch.long, device=device), [0] * N)
    if isinstance(initial_state, MomentumDeltaRuleState):
        M = _weights("M", initial_state.M, shape, device, dtype)
        S = _weights("S", initial_state.S, shape, device, dtype)
        anchor = _weights("anchor", initial_state.anchor, shape, device, dtype)
        offset, offsets = read_offset(initial_state.offset, N, initial_state.chunk_size, chunk_size, device)
        # on a chunk boundary the next token anchors at M: the given anchor plays no part
        return ResolvedState(M, S, torch.where(at_boundary(offset), M, anchor), offset, offsets)
    if isinstance(initial_state, (tuple, list)):
        if len(initial_state) not in (1, 2):
            raise ValueError(f"`initial_state` as a tuple must be (M,) or (M, S), got {len(initial_state)} items")
        M = _weights("M", initial_state[0], shape, device, dtype)
        S = _weights("S", initial_state[1], shape, device, dtype) if len(initial_state) == 2 else torch.zeros_like(M)
        return ResolvedState(M, S, M, torch.zeros(N, dtype=torch.long, device=device), [0] * N)
    raise TypeError("`initial_state` must be None, a MomentumDeltaRuleState, or a tuple (M,) / (M, S); "
                    f"got {type(initial_state).__name__}")

