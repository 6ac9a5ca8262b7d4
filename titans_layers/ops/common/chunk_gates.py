"""Gate coefficients of the chunked form, shared by the PyTorch paths of every op family.

Within a chunk (positions 1..C, rows of a padded layout) with ``a = 1 - alpha``, ``e = eta`` and
``m`` = 1 on real tokens, 0 on padding (padding must not write: ``W_t = a_t W_{t-1} + m_t S_t``),
the weights after position t are::

    W_t = A_t W_0 + B_t S_0 - sum_j Gamma[t, j] * (theta_j * G_j)
    S_t = E_t S_0 - sum_j D_e[t, j] * (theta_j * G_j)

with ``D_a[t, i] = prod_{l=i+1..t} a_l`` (and D_e alike), ``A = cumprod(a)``, ``E = cumprod(e)``,
``B = D_a @ (m * E)`` and ``Gamma = D_a @ (m * D_e)``. No division anywhere: gates of exactly 0
or 1 stay exact and finite, also under autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def segment_products(g: torch.Tensor) -> torch.Tensor:
    """Products of a gate over every causal segment of a chunk, without division.

    g: ``[..., C]`` -> D: ``[..., C, C]`` with ``D[t, j] = prod_{l = j+1..t} g_l`` for ``t >= j``
    (so ``D[t, t] = 1``) and 0 above the diagonal. A cumulative product down the columns of a
    masked matrix gives each entry exactly, so gates of exactly 0 stay exact and finite, also in
    the backward (unlike ratios of cumulative products, or differences of cumulative logs).
    """
    C = g.shape[-1]
    r = torch.arange(C, device=g.device)
    strictly_below = r[:, None] > r[None, :]  # [C, C]
    X = torch.where(strictly_below, g.unsqueeze(-1), torch.ones((), dtype=g.dtype, device=g.device))
    return torch.cumprod(X, dim=-2).tril()


class ChunkGates(NamedTuple):
    """Coefficients for every chunk: matrices ``[..., C, C]``, vectors ``[..., C]``."""

    Gamma: torch.Tensor  # weight of write j in the weights after t
    A: torch.Tensor  # weight of W_0 in W_t
    B: torch.Tensor  # weight of S_0 in W_t
    E: torch.Tensor  # weight of S_0 in S_t
    g: torch.Tensor  # Gamma's last row [..., C, 1]: writes into the chunk-end weights
    h: torch.Tensor  # D_e's last row [..., C, 1]: writes into the chunk-end momentum


def chunk_gates(alpha: torch.Tensor, eta: torch.Tensor, m: torch.Tensor) -> ChunkGates:
    """alpha, eta, m: ``[..., C]`` (chunks in the last dim) -> :class:`ChunkGates`."""
    a = 1 - alpha
    D_a, D_e = segment_products(a), segment_products(eta)  # [..., C, C]
    A, E = torch.cumprod(a, -1), torch.cumprod(eta, -1)  # [..., C]
    Gamma = D_a @ (m.unsqueeze(-1) * D_e)
    B = (D_a @ (m * E).unsqueeze(-1)).squeeze(-1)
    return ChunkGates(Gamma=Gamma, A=A, B=B, E=E, g=Gamma[..., -1, :, None], h=D_e[..., -1, :, None])
