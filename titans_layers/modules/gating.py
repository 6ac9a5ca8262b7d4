"""``MemoryGate``: combines an attention branch and a memory branch, as MAG does."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from titans_layers.modules.checks import positive_finite, positive_int

GATE_ACTIVATIONS = {"sigmoid": torch.sigmoid, "silu": F.silu}


class MemoryGate(nn.Module):
    """``out = norm_a(a) * act(norm_m(m))``: both branches normalised (RMSNorm with learned
    per-channel weights), then the memory branch gates the attention branch through a
    non-linearity (the paper's MAG combination ``y ⊗ M(x)``).

    ``forward(a [B, T, D], m [B, T, D]) -> [B, T, D]``.
    """

    def __init__(self, hidden_size: int, activation: str = "sigmoid", norm_eps: float = 1e-5):
        super().__init__()
        positive_int("hidden_size", hidden_size)
        positive_finite("norm_eps", norm_eps)
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {tuple(GATE_ACTIVATIONS)}, got {activation!r}")
        self.norm_a = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.norm_m = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.act = GATE_ACTIVATIONS[activation]

    def forward(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if a.shape != m.shape:
            raise ValueError(f"the two branches must have one shape, got `a` {list(a.shape)} and `m` {list(m.shape)}")
        return self.norm_a(a) * self.act(self.norm_m(m))
