"""The MLP memory's activations and their first two derivatives (the PyTorch paths)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu")

_INV_SQRT_2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def act(z: torch.Tensor, activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The memory's activation: SiLU, or GELU in its exact erf form (into ``out`` if given)."""
    if out is None:
        return F.silu(z) if activation == "silu" else F.gelu(z)
    if activation == "silu":
        return torch.ops.aten.silu.out(z, out=out)
    return torch.ops.aten.gelu.out(z, approximate="none", out=out)


def act_derivatives(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(act(z), act'(z), act''(z))``, sharing one sigmoid (SiLU: ``s = sigmoid(z)``, ``z s``,
    ``s (1 + z (1 - s))``, ``s (1 - s) (2 + z (1 - 2 s))``) or one erf and one exp (GELU:
    ``z Phi(z)``, ``Phi(z) + z phi(z)``, ``phi(z) (2 - z^2)``, ``phi`` the standard normal density)."""
    if activation == "silu":
        s = torch.sigmoid(z)
        one_minus = 1 - s
        d1 = torch.addcmul(s, s * z, one_minus)  # s (1 + z (1 - s))
        d2 = (s * one_minus).mul_(torch.addcmul(torch.full_like(z, 2.0), z, one_minus - s))
        return z * s, d1, d2
    cdf = torch.erf(z * _INV_SQRT_2).add_(1).mul_(0.5)
    pdf = torch.exp(-0.5 * z * z).mul_(_INV_SQRT_2PI)
    return z * cdf, torch.addcmul(cdf, z, pdf), pdf * (2 - z * z)


def act_vjp(grad: torch.Tensor, z: torch.Tensor, activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad * act'(z)`` in one fused op (ATen's own activation backward; into ``out`` if given)."""
    if out is not None:
        if activation == "silu":
            return torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=out)
        return torch.ops.aten.gelu_backward.grad_input(grad, z, approximate="none", grad_input=out)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z, approximate="none")
