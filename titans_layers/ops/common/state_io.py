"""Reading ``initial_state`` pieces, shared by every op family: weights and chunk offsets."""

from __future__ import annotations

import torch


def read_weights(name: str, x, N: int, tail: tuple[int, ...], layout: str, device, dtype) -> torch.Tensor:
    """Check one state tensor ``[N or 1, *tail]`` and return it as ``[N, *tail]`` in ``dtype``
    (a leading dim of 1 is broadcast: a learned initial memory). ``layout`` names the dims."""
    expected = f"{layout} = [{N} (or 1), {', '.join(str(d) for d in tail)}]"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`initial_state.{name}` must be a tensor of shape {expected}, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"`initial_state.{name}` must be a floating tensor, got {x.dtype}")
    if x.ndim != 1 + len(tail) or x.shape[0] not in (1, N) or tuple(x.shape[1:]) != tuple(tail):
        raise ValueError(f"`initial_state.{name}` must have shape {expected}, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"`initial_state.{name}` is on {x.device} but the inputs are on {device}")
    return x.to(dtype).expand(N, *tail)


def read_offset(offset, N: int, state_chunk_size: int, chunk_size: int, device) -> tuple[torch.Tensor, list[int]]:
    """Check a state's chunk offsets ``[N or 1]`` and return them as ``[N]`` int64 and on the host.
    Continuing mid-chunk needs the chunk size the state was made with."""
    if isinstance(state_chunk_size, bool) or not isinstance(state_chunk_size, int) or state_chunk_size < 1:
        raise ValueError(f"`initial_state.chunk_size` must be an int >= 1, got {state_chunk_size!r}")
    if not isinstance(offset, torch.Tensor) or offset.dtype.is_floating_point or offset.dtype == torch.bool \
            or offset.ndim != 1 or offset.shape[0] not in (1, N):
        raise ValueError(f"`initial_state.offset` must be an integer tensor [N] = [{N}], got {offset!r}")
    offset = offset.to(device=device, dtype=torch.long).expand(N).contiguous()
    offsets = offset.tolist()
    if any(o < 0 or o >= state_chunk_size for o in offsets):
        raise ValueError(f"`initial_state.offset` must lie in [0, {state_chunk_size}), got {offsets}")
    if any(offsets) and state_chunk_size != chunk_size:
        raise ValueError(f"`initial_state` stops mid-chunk with chunk_size = {state_chunk_size}; "
                         f"continue it with that chunk_size, got chunk_size = {chunk_size}")
    return offset, offsets


def at_boundary(offset: torch.Tensor) -> torch.Tensor:
    """``[N, 1, 1, 1]`` bool: rows that sit on a chunk boundary (their anchor is their weights)."""
    return (offset == 0).view(-1, 1, 1, 1)
