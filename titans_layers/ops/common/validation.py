"""Argument checks shared by every op of every family (SPEC §1, promise 6).

Every check runs before any kernel and raises a ``ValueError`` or ``TypeError`` that names the
argument, the shape or type it had, and what was expected. Nothing is broadcast silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class OpShape:
    """Sizes of one op call after checking: batch B, length T, heads H, key dim K, value dim V,
    and N, the number of sequences (B, or ``len(cu_seqlens) - 1`` for packed input)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    N: int


def _shape_str(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_tensor(name: str, x, ndim: int, layout: str) -> None:
    """Raise unless ``x`` is a floating tensor of rank ``ndim`` (``layout`` names the dims)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"`{name}` must have shape {layout} ({ndim} dims), got {_shape_str(x)}")


def check_cu_seqlens(cu_seqlens, B: int, T: int, device: torch.device, read_offsets: bool = True) -> int:
    """Check packed-sequence offsets and return the number of sequences N.

    ``cu_seqlens`` must be a 1-D integer tensor ``[N + 1]`` on the inputs' device, starting at 0,
    non-decreasing, ending at T, used with B == 1. ``read_offsets=False`` skips the checks that read
    the offsets on the host (start, order, end): for ``torch.compile``, which cannot trace host reads.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"`cu_seqlens` must be a 1-D integer torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype in (torch.bool, torch.complex64,
                                                                                          torch.complex128):
        raise TypeError(f"`cu_seqlens` must be a 1-D integer tensor [N + 1], got dtype {cu_seqlens.dtype} "
                        f"and shape {_shape_str(cu_seqlens)}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"`cu_seqlens` must hold at least 2 offsets ([N + 1] with N >= 1), got {cu_seqlens.numel()}")
    if cu_seqlens.device != device:
        raise ValueError(f"`cu_seqlens` is on {cu_seqlens.device} but the inputs are on {device}")
    if B != 1:
        raise ValueError(f"with `cu_seqlens` the inputs must be packed into batch size 1, got B = {B}")
    if not read_offsets:
        return cu_seqlens.numel() - 1
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"`cu_seqlens` must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"`cu_seqlens` must be non-decreasing, got {offsets}")
    if offsets[-1] != T:
        raise ValueError(f"`cu_seqlens` must end at T = {T} (the packed length), got {offsets[-1]}")
    return len(offsets) - 1


def check_chunk_size(chunk_size, allowed: tuple[int, ...] | None = None) -> int:
    """Raise unless ``chunk_size`` is an int >= 1 (and in ``allowed`` when given)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"`chunk_size` must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    if allowed is not None and chunk_size not in allowed:
        raise ValueError(f"`chunk_size` must be one of {allowed} for the Triton kernels, got {chunk_size}")
    return chunk_size


def check_op_inputs(q, k, v, alpha, eta, theta, cu_seqlens=None) -> OpShape:
    """Check the common ``(q, k, v, alpha, eta, theta)`` signature and return the sizes.

    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; alpha, eta, theta ``[B, T, H]``; all on
    one device; q, k and v of one floating dtype (gates may be of any floating dtype).
    """
    check_tensor("q", q, 4, "[B, T, H, K]")
    B, T, H, K = q.shape
    check_tensor("k", k, 4, "[B, T, H, K]")
    if k.shape != q.shape:
        raise ValueError(f"`k` must have the shape of `q` [B, T, H, K] = {_shape_str(q)}, got {_shape_str(k)}")
    check_tensor("v", v, 4, "[B, T, H, V]")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"`v` must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {_shape_str(v)}")
    for name, g in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        check_tensor(name, g, 3, "[B, T, H]")
        if g.shape != q.shape[:3]:
            raise ValueError(f"`{name}` must have shape [B, T, H] = [{B}, {T}, {H}], got {_shape_str(g)}")
    for name, x in (("k", k), ("v", v), ("alpha", alpha), ("eta", eta), ("theta", theta)):
        if x.device != q.device:
            raise ValueError(f"`{name}` is on {x.device} but `q` is on {q.device}: all inputs must share a device")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"`{name}` has dtype {x.dtype} but `q` has {q.dtype}: q, k and v must share a dtype")
    if K == 0 or v.shape[-1] == 0 or H == 0:
        raise ValueError(f"head dims and head count must be positive, got H = {H}, K = {K}, V = {v.shape[-1]}")
    if B == 0:
        raise ValueError("`q` must have a batch size B >= 1, got B = 0")
    N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T, q.device)
    return OpShape(B=B, T=T, H=H, K=K, V=v.shape[-1], N=N)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the PyTorch ops: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
