"""Sequence layout for the PyTorch paths: one padded row per sequence, aligned to chunk boundaries.

A sequence that continues a state ``offset`` tokens into a chunk is left-padded with ``offset``
padding tokens, so that its chunk boundaries fall at multiples of the chunk size; it is
right-padded to a whole number of chunks. Padding tokens must not write:
each op family masks their writes (see its ``naive`` module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PaddedLayout:
    """Where each sequence's tokens sit in the padded ``[N, L, ...]`` layout.

    ``index`` ``[N, L]`` holds flat token indices (clamped where invalid), ``valid`` ``[N, L]`` is
    True on real tokens; ``None`` for both means the layout is plain right padding of ``[B, T]``.
    """

    N: int
    L: int
    T: int
    index: torch.Tensor | None
    valid: torch.Tensor | None

    def valid_mask(self, device) -> torch.Tensor:
        """``[N, L]`` bool, True on real tokens (also for the plain right-padded layout)."""
        if self.valid is not None:
            return self.valid
        return (torch.arange(self.L, device=device) < self.T).expand(self.N, self.L)


def sequence_lengths(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[int]:
    """Lengths of the N sequences: B times T, or the gaps of ``cu_seqlens``."""
    if cu_seqlens is None:
        return [T] * B
    offsets = cu_seqlens.tolist()
    return [b - a for a, b in zip(offsets[:-1], offsets[1:])]


def make_layout(B: int, T: int, cu_seqlens, offsets: list[int], chunk_size: int, device) -> PaddedLayout:
    """Build the padded layout for N sequences that start ``offsets[i]`` tokens into a chunk."""
    lengths = sequence_lengths(B, T, cu_seqlens)
    N = len(lengths)
    span = max((o + n for o, n in zip(offsets, lengths)), default=0)
    L = -(-span // chunk_size) * chunk_size
    if cu_seqlens is None and not any(offsets):
        return PaddedLayout(N=N, L=L, T=T, index=None, valid=None)
    starts = cu_seqlens.tolist()[:-1] if cu_seqlens is not None else [i * T for i in range(N)]
    pos = torch.arange(L, device=device)[None, :]  # [1, L]
    off = torch.tensor(offsets, device=device)[:, None]  # [N, 1]
    rel = pos - off  # [N, L] index within the sequence
    valid = (rel >= 0) & (rel < torch.tensor(lengths, device=device)[:, None])
    index = (torch.tensor(starts, device=device)[:, None] + rel).clamp(0, max(B * T - 1, 0))
    return PaddedLayout(N=N, L=L, T=T, index=index, valid=valid)


def to_padded(x: torch.Tensor, layout: PaddedLayout, fill: float) -> torch.Tensor:
    """``[B, T, *rest]`` -> ``[N, L, *rest]`` with ``fill`` on padding positions (differentiable)."""
    if layout.index is None:
        pad = [0, 0] * (x.ndim - 2) + [0, layout.L - layout.T]
        return F.pad(x, pad, value=fill)
    flat = x.reshape(-1, *x.shape[2:])  # [B * T, *rest]
    if flat.shape[0] == 0:
        return x.new_full((layout.N, layout.L, *x.shape[2:]), fill)
    gathered = flat[layout.index]  # [N, L, *rest]
    mask = layout.valid.view(*layout.valid.shape, *([1] * (x.ndim - 2)))
    return torch.where(mask, gathered, torch.full((), fill, dtype=x.dtype, device=x.device))


def from_padded(y: torch.Tensor, layout: PaddedLayout, B: int) -> torch.Tensor:
    """``[N, L, *rest]`` -> ``[B, T, *rest]``: the real tokens, in their original order."""
    if layout.index is None:
        return y[:, : layout.T]
    return y[layout.valid].reshape(B, layout.T, *y.shape[2:])


# Values of padding tokens: no query, no key, no value, no forgetting, momentum kept, no step.
PAD_VALUES = {"q": 0.0, "k": 0.0, "v": 0.0, "alpha": 0.0, "eta": 1.0, "theta": 0.0}


def pad_op_inputs(inputs: dict, layout: PaddedLayout, dtype) -> dict:
    """The op inputs (named as in :data:`PAD_VALUES`) in the padded layout, in ``dtype``."""
    return {name: to_padded(x.to(dtype), layout, PAD_VALUES[name]) for name, x in inputs.items()}


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[N, L, H, *rest]`` -> ``[N, H, L / C, C, *rest]``."""
    N, L, H = x.shape[:3]
    return x.reshape(N, L // chunk_size, chunk_size, H, *x.shape[3:]).movedim(3, 1)
