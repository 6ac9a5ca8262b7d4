"""Op inputs drawn from a seed: :class:`OpCase` and :func:`make_case` (no Hypothesis needed)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class OpCase:
    """One call's worth of inputs for a memory-update op.

    q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; alpha, eta, theta ``[B, T, H]`` (in ``dtype``);
    ``initial_state`` None or a tuple of float32 (float64 for float64 cases) weights ``[N or 1, H, K, V]``;
    ``cu_seqlens`` ``[N + 1]`` int64 (then B == 1) or None; ``split`` in ``[0, T]``: where the
    continuation check cuts the sequence; ``family`` "linear" or "mlp"; ``extra``: keyword
    arguments of the family's ops (``activation``, ``residual`` for "mlp").
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor
    eta: torch.Tensor
    theta: torch.Tensor
    chunk_size: int
    initial_state: tuple | None
    cu_seqlens: torch.Tensor | None
    split: int
    seed: int
    family: str = "linear"
    extra: dict = field(default_factory=dict)  # family options passed to the op (activation, residual)

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """``(q, k, v, alpha, eta, theta)``."""
        return self.q, self.k, self.v, self.alpha, self.eta, self.theta

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def __repr__(self) -> str:
        B, T, H, K = self.q.shape
        init = None if self.initial_state is None else [list(x.shape) for x in self.initial_state]
        cu = None if self.cu_seqlens is None else self.cu_seqlens.tolist()
        return (f"OpCase(family={self.family}, B={B}, T={T}, H={H}, K={K}, V={self.v.shape[-1]}, {self.extra}, "
                f"dtype={self.dtype}, "
                f"chunk_size={self.chunk_size}, initial_state={init}, cu_seqlens={cu}, split={self.split}, "
                f"seed={self.seed})")


def _gates(shape, gen, extremes: float, low: float, high: float, device, top: float = 1.0) -> torch.Tensor:
    """Uniform gates in [low, high] with a fraction ``extremes`` set to exactly 0 or ``top``."""
    g = low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
    pick = torch.rand(shape, generator=gen) < extremes
    ones = torch.rand(shape, generator=gen) < 0.5
    g = torch.where(pick, ones.to(torch.float64) * top, g)
    return g.to(device)


def make_case(*, seed: int, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, chunk_size: int,
              extremes: float = 0.1, state: str = "none", lengths: list[int] | None = None, split: int = 0,
              family: str = "linear", hidden: int | None = None, activation: str = "silu", residual: bool = False,
              device="cpu") -> OpCase:
    """Draw a case from ``seed``.

    ``state``: "none" (linear only), "M" (weights only: ``(M,)`` or ``(W1, W2)``), "MS" (weights
    and momenta) or "shared" (weights with a leading dim of 1, a learned initial memory).
    ``lengths``: packed sequence lengths (then B must be 1 and ``sum(lengths) == T``).
    ``family`` "mlp" takes ``hidden`` (Dh, default 2K), ``activation`` and ``residual``.
    Keys are unit-norm (as the layers make them); gates: alpha in [0, 0.3], eta in [0, 0.95],
    theta in [0, 0.6] (linear) or [0, 0.05] (mlp), with a fraction ``extremes`` of alpha and eta
    at exactly 0 or 1 and of theta at 0 or its top (1 for linear memory).
    """
    if family not in ("linear", "mlp"):
        raise ValueError(f"`family` must be 'linear' or 'mlp', got {family!r}")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) / K ** 0.5
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    alpha = _gates((B, T, H), gen, extremes, 0.0, 0.3, device)
    eta = _gates((B, T, H), gen, extremes, 0.0, 0.95, device)
    # an MLP's curvature is not bounded by unit-norm keys: smaller steps keep its memory finite
    step = 0.6 if family == "linear" else 0.05
    theta = _gates((B, T, H), gen, extremes, 0.0, step, device, top=1.0 if family == "linear" else step)
    cu_seqlens = None
    N = B
    if lengths is not None:
        if B != 1 or sum(lengths) != T:
            raise ValueError(f"packed lengths {lengths} need B == 1 and sum == T = {T}")
        cu_seqlens = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.long,
                                  device=device)
        N = len(lengths)
    sdtype = torch.float64 if dtype == torch.float64 else torch.float32
    extra = {}
    if family == "linear":
        shapes, scales = [(H, K, V)], [0.5]
    else:
        Dh = hidden or 2 * K
        shapes, scales = [(H, K, Dh), (H, Dh, V)], [K ** -0.5, Dh ** -0.5]
        extra = dict(activation=activation, residual=residual)
        state = "M" if state == "none" else state  # an MLP memory needs its weights
    initial_state = None
    if state != "none":
        rows = 1 if state == "shared" else N
        weights = [s * torch.randn(rows, *shp, generator=gen) for shp, s in zip(shapes, scales)]
        momenta = [0.1 * torch.randn(N, *shp, generator=gen) for shp in shapes] if state == "MS" else []
        initial_state = tuple(x.to(device=device, dtype=sdtype) for x in weights + momenta)
    cast = lambda x: x.to(device=device, dtype=dtype)
    return OpCase(q=cast(q), k=cast(k), v=cast(v), alpha=cast(alpha), eta=cast(eta), theta=cast(theta),
                  chunk_size=chunk_size, initial_state=initial_state, cu_seqlens=cu_seqlens, split=split, seed=seed,
                  family=family, extra=extra)


# Gates pinned at exactly 0 or 1 on every token (SPEC §1 promise 4), by name: arguments of :func:`pin_gates`.
GATE_PATTERNS = {
    "alpha = 1 (erase)": dict(alpha=1.0),
    "eta = 1, alpha = 0 (no decay)": dict(eta=1.0, alpha=0.0),
    "eta = 0 (no momentum)": dict(eta=0.0),
    "theta = 0 (no write)": dict(theta=0.0),
    "all gates 0": dict(alpha=0.0, eta=0.0, theta=0.0),
    "all gates 1": dict(alpha=1.0, eta=1.0, theta=1.0),
}


def pin_gates(case: OpCase, **values: float) -> OpCase:
    """``case`` with each named gate (``alpha``, ``eta``, ``theta``) set to one value on every token."""
    return replace(case, **{gate: torch.full_like(getattr(case, gate), value) for gate, value in values.items()})
