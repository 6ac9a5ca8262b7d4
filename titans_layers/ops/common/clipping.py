"""Per-step update clipping: a bound on the norm of each token's write to the memory.

Token t writes ``theta_t * G_t`` (its gradient at the chunk's anchor weights, all weights of the
head together) into the momentum. With ``max_update_norm = c`` the step size becomes::

    theta'_t = theta_t * min(1, c / (theta_t * ||G_t||_F))

so every write has Frobenius norm <= c: the update of a Huber-type loss, linear in the error
beyond the bound instead of quadratic. ``G_t`` is taken at the anchor, so ``theta'`` is a
per-token scalar of the chunk and the chunked (dual) form holds unchanged.
"""

from __future__ import annotations

import math

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


def check_max_update_norm(max_update_norm) -> float | None:
    """None, or a positive finite number that float32 holds (the kernels take it as float32);
    anything else raises naming the argument."""
    if max_update_norm is None:
        return None
    if isinstance(max_update_norm, bool) or not isinstance(max_update_norm, (int, float)) \
            or not math.isfinite(max_update_norm) or max_update_norm <= 0:
        raise ValueError(f"`max_update_norm` must be None or a positive finite number, got {max_update_norm!r}")
    if max_update_norm > FLOAT32_MAX:
        raise ValueError(f"`max_update_norm` must be at most float32's largest value {FLOAT32_MAX:.4g} (None: no "
                         f"bound), got {max_update_norm!r}")
    return float(max_update_norm)


def clipped_step(theta: torch.Tensor, write_norm: torch.Tensor, max_update_norm: float | None) -> torch.Tensor:
    """``theta`` scaled so that ``theta * write_norm <= max_update_norm`` (unchanged where it already
    is, or when the bound is None). Finite gradients everywhere, zero norms and zero steps included."""
    if max_update_norm is None:
        return theta
    clipped = theta * write_norm > max_update_norm
    safe_norm = torch.where(clipped, write_norm, torch.ones_like(write_norm))  # no 1/0 in the branch not taken
    # where clipped the step is c / ||G||, exactly independent of theta (a zero gradient, not a rounding residue)
    return torch.where(clipped, max_update_norm / safe_norm, theta)
