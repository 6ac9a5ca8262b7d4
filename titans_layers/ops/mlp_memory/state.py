"""The recurrent state of the MLP-memory update, and how ``initial_state`` is read."""

from __future__ import annotations

from typing import NamedTuple

import torch

from titans_layers.ops.common.state_io import at_boundary, read_offset, read_weights
from titans_layers.ops.common.validation import OpShape


class MLPMemoryState(NamedTuple):
    """Everything needed to continue an MLP-memory update exactly, also mid-chunk.

    Fields (``N`` rows: one per batch element, or per packed sequence with ``cu_seqlens``), all
    float32 (float64 from the float64 reference):

    - ``W1`` ``[N, H, K, Dh]``, ``W2`` ``[N, H, Dh, V]``: the memory weights after the last token.
    - ``S1``, ``S2``: the momenta, same shapes.
    - ``anchor1``, ``anchor2``: the weights at the start of the current chunk, where the remaining
      tokens of that chunk take their gradients; equal to W1, W2 when ``offset`` is 0.
    - ``offset`` ``[N]`` int64: tokens already processed in the current chunk, in ``[0, chunk_size)``.
    - ``chunk_size``: the chunk size the state was produced with.

    As ``initial_state`` the tuples ``(W1, W2)`` and ``(W1, W2, S1, S2)`` also work (a chunk
    boundary, zero momentum when S is absent); weights with a leading dim of 1 are broadcast over
    the N rows (a learned initial memory) and receive summed gradients.
    """

    W1: torch.Tensor
    W2: torch.Tensor
    S1: torch.Tensor
    S2: torch.Tensor
    anchor1: torch.Tensor
    anchor2: torch.Tensor
    offset: torch.Tensor
    chunk_size: int


class ResolvedMLPState(NamedTuple):
    """``initial_state`` as full tensors ``[N, H, ...]`` in the compute dtype (still attached to autograd)."""

    W1: torch.Tensor  # [N, H, K, Dh]
    W2: torch.Tensor  # [N, H, Dh, V]
    S1: torch.Tensor
    S2: torch.Tensor
    anchor1: torch.Tensor
    anchor2: torch.Tensor
    offset: torch.Tensor  # [N] int64
    offsets: list[int]  # the same on the host


def hidden_size(initial_state) -> int:
    """Dh, read from the first-layer weights of ``initial_state`` (an MLP memory needs them)."""
    if initial_state is None:
        raise ValueError("an MLP memory needs `initial_state` with its weights: (W1, W2), (W1, W2, S1, S2) "
                         "or an MLPMemoryState; W1 is [N or 1, H, K, Dh], W2 is [N or 1, H, Dh, V]")
    if not isinstance(initial_state, (MLPMemoryState, tuple, list)):
        raise TypeError("`initial_state` must be an MLPMemoryState or a tuple (W1, W2) / (W1, W2, S1, S2); "
                        f"got {type(initial_state).__name__}")
    W1 = initial_state.W1 if isinstance(initial_state, MLPMemoryState) else \
        (initial_state[0] if len(initial_state) else None)
    if not isinstance(W1, torch.Tensor) or W1.ndim != 4:
        raise ValueError("`initial_state` W1 must be a tensor [N or 1, H, K, Dh], "
                         f"got {type(W1).__name__ if not isinstance(W1, torch.Tensor) else list(W1.shape)}")
    if W1.shape[-1] == 0:
        raise ValueError(f"`initial_state` W1 must have a hidden width Dh >= 1, got shape {list(W1.shape)}")
    return W1.shape[-1]


def resolve_mlp_state(initial_state, shape: OpShape, chunk_size: int, device, dtype=torch.float32) -> ResolvedMLPState:
    """Read ``initial_state`` (a tuple or an :class:`MLPMemoryState`) into full tensors."""
    N, H, K, V = shape.N, shape.H, shape.K, shape.V
    Dh = hidden_size(initial_state)
    w1 = lambda name, x: read_weights(name, x, N, (H, K, Dh), "[N, H, K, Dh]", device, dtype)
    w2 = lambda name, x: read_weights(name, x, N, (H, Dh, V), "[N, H, Dh, V]", device, dtype)
    if isinstance(initial_state, MLPMemoryState):
        W1, W2 = w1("W1", initial_state.W1), w2("W2", initial_state.W2)
        S1, S2 = w1("S1", initial_state.S1), w2("S2", initial_state.S2)
        a1, a2 = w1("anchor1", initial_state.anchor1), w2("anchor2", initial_state.anchor2)
        offset, offsets = read_offset(initial_state.offset, N, initial_state.chunk_size, chunk_size, device)
        # on a chunk boundary the next token anchors at the current weights
        boundary = at_boundary(offset)
        return ResolvedMLPState(W1, W2, S1, S2, torch.where(boundary, W1, a1), torch.where(boundary, W2, a2),
                                offset, offsets)
    if len(initial_state) not in (2, 4):
        raise ValueError(f"`initial_state` as a tuple must be (W1, W2) or (W1, W2, S1, S2), "
                         f"got {len(initial_state)} items")
    W1, W2 = w1("W1", initial_state[0]), w2("W2", initial_state[1])
    if len(initial_state) == 4:
        S1, S2 = w1("S1", initial_state[2]), w2("S2", initial_state[3])
    else:
        S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)
    offset = torch.zeros(N, dtype=torch.long, device=device)
    return ResolvedMLPState(W1, W2, S1, S2, W1, W2, offset, [0] * N)
