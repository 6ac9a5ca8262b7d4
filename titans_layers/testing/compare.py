"""Relative-error comparison and the SPEC §1 tolerances."""

from __future__ import annotations

import torch

# SPEC §1 tolerances: relative error ||a - b|| / ||b|| against a float64 reference.
_TOLERANCES = {
    # (dtype group, on_gpu): (outputs and states, gradients)
    ("float64", False): (1e-10, 1e-9),
    ("float64", True): (1e-10, 1e-9),
    ("float32", False): (1e-5, 1e-4),
    ("float32", True): (2e-3, 2e-3),
    ("half", False): (2e-2, 5e-2),
    ("half", True): (2e-2, 5e-2),
}


def tolerance(dtype: torch.dtype, device, kind: str = "output") -> float:
    """SPEC tolerance for inputs of ``dtype`` computed on ``device``; ``kind`` is "output"
    (outputs and states) or "grad"."""
    group = {torch.float64: "float64", torch.float32: "float32"}.get(dtype, "half")
    on_gpu = torch.device(device).type == "cuda"
    out_tol, grad_tol = _TOLERANCES[(group, on_gpu)]
    return out_tol if kind == "output" else grad_tol


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``||actual - reference|| / ||reference||`` in float64 (absolute error when the reference is 0);
    ``inf`` when ``actual`` holds a NaN or inf, so a non-finite value never passes.

    ``actual``'s dtype cannot hold values below its smallest normal number ``tiny`` with full
    precision (float16: 6.1e-5; a float16 output of a memory decayed to 1e-9 is all zeros), so a
    reference whose norm is below ``tiny * sqrt(numel)`` is measured against that floor: an
    absolute error in units of the dtype's smallest normal. Only float16 ever reaches it."""
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    b = reference.detach().to(device="cpu", dtype=torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {list(a.shape)} != reference shape {list(b.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    denom = b.norm().item()
    err = (a - b).norm().item()
    if denom == 0:
        return err
    if actual.is_floating_point():
        denom = max(denom, torch.finfo(actual.dtype).tiny * b.numel() ** 0.5)
    return err / denom


def assert_close(name: str, actual: torch.Tensor, reference: torch.Tensor, tol: float) -> float:
    """Raise an AssertionError naming ``name`` unless ``relative_error(actual, reference) <= tol``.
    Returns the error."""
    err = relative_error(actual, reference)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > tolerance {tol:.1e}")
    return err


def _bits(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    # a fresh dense copy: a "contiguous" tensor with size-1 dims may still have a last stride != 1
    return flat.new_empty(flat.shape).copy_(flat).view(torch.uint8)


def assert_identical(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise unless ``a`` and ``b`` are bit-identical (same shape, dtype and bits)."""
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(_bits(a), _bits(b)):
        raise AssertionError(f"{name}: two runs on the same inputs differ")
