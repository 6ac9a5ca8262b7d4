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


def act_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """First derivative of :func:`act` at ``z``."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    return 0.5 * (1 + torch.erf(z * _INV_SQRT_2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def act_grad2(z: torch.Tensor, activation: str) -> torch.Tensor:
    """Second derivative of :func:`act` at ``z``: ``s (1 - s) (2 + z (1 - 2 s))`` for SiLU
    (``s = sigmoid(z)``), ``phi(z) (2 - z^2)`` for GELU (``phi`` the standard normal density)."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI * (2 - z * z)


def act_vjp(grad: torch.Tensor, z: torch.Tensor, activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad * act'(z)`` in one fused op (ATen's own activation backward; into ``out`` if given)."""
    if out is not None:
        if activation == "silu":
            return torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=out)
        return torch.ops.aten.gelu_backward.grad_input(grad, z, approximate="none", grad_input=out)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z, approximate="none")
