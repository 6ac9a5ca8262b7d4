"""Plain-PyTorch implementations of the MLP-memory update: the per-token reference and the
vectorised dual form (the CPU execution path).

Memory ``f(x) = act(x @ W1) @ W2`` (``+ x`` with ``residual=True``), W1 ``[K, Dh]``, W2 ``[Dh, V]``,
loss ``0.5 * ||f(k_t) - v_t||^2``, gradients at the chunk's anchor weights, then per weight the
same momentum / forget recurrence as the linear memory (SPEC §1).

Dual form. At the anchor each token's gradients are rank one: with ``Z = K W1a``,
``Hk = act(Z)``, ``Err = f(K) - V`` and ``Delta = (Err W2a^T) * act'(Z)``::

    G1_j = k_j^T Delta_j        G2_j = Hk_j^T Err_j

so both weights follow the linear memory's chunk trajectories (``chunk_gates``), with
``X1 = theta * Delta`` and ``X2 = theta * Err`` as the written rows. A query reads its own
per-token weights through matmuls against the chunk-start weights::

    Zq = A * (Q W1_0) + B * (Q S1_0) - ((Q K^T) * Gamma) X1          [C, Dh]
    O  = A * (Hq W2_0) + B * (Hq S2_0) - ((Hq Hk^T) * Gamma) X2       Hq = act(Zq)

No per-token weight copies: memory O(C^2 + C (K + Dh + V)) per chunk and head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from titans_layers.ops.common.chunk_gates import chunk_gates
from titans_layers.ops.common.clipping import check_max_update_norm, clipped_step
from titans_layers.ops.common.layout import from_padded, make_layout, pad_op_inputs, sequence_lengths, to_chunks
from titans_layers.ops.common.state_io import at_boundary
from titans_layers.ops.common.traceable import traceable
from titans_layers.ops.common.validation import check_chunk_size, check_op_inputs, compute_dtype
from titans_layers.ops.mlp_memory.state import MLPMemoryState, resolve_mlp_state

ACTIVATIONS = ("silu", "gelu")


def check_mlp_options(activation, residual, K: int, V: int) -> None:
    """Raise unless ``activation`` is known and ``residual`` fits the head dims."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"`residual` must be a bool, got {type(residual).__name__}")
    if residual and K != V:
        raise ValueError(f"`residual=True` adds the key to the memory's output and needs K == V, got K = {K}, V = {V}")


def act(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The memory's activation: SiLU, or GELU in its exact erf form."""
    return F.silu(z) if activation == "silu" else F.gelu(z)


def act_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """Derivative of :func:`act` at ``z``."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def mlp_forward(x, W1, W2, activation: str, residual: bool):
    """``f(x) = act(x @ W1) @ W2 (+ x)`` for rows ``x`` ``[..., n, K]`` and weights ``[..., K, Dh]``, ``[..., Dh, V]``."""
    y = act(x @ W1, activation) @ W2
    return y + x if residual else y


def _prepare(q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens, activation, residual,
             max_update_norm, layout_chunk):
    shape = check_op_inputs(q, k, v, alpha, eta, theta, cu_seqlens)
    C = check_chunk_size(chunk_size)
    check_mlp_options(activation, residual, shape.K, shape.V)
    check_max_update_norm(max_update_norm)
    dtype = compute_dtype(q)
    init = resolve_mlp_state(initial_state, shape, C, q.device, dtype)
    layout = make_layout(shape.B, shape.T, cu_seqlens, init.offsets if layout_chunk > 1 else [0] * shape.N,
                         layout_chunk, q.device)
    x = pad_op_inputs(dict(q=q, k=k, v=v, alpha=alpha, eta=eta, theta=theta), layout, dtype)
    return shape, C, init, layout, x


def _final_state(W1, W2, S1, S2, a1, a2, offset, C) -> MLPMemoryState:
    boundary = at_boundary(offset)
    return MLPMemoryState(W1=W1, W2=W2, S1=S1, S2=S2, anchor1=torch.where(boundary, W1, a1),
                          anchor2=torch.where(boundary, W2, a2), offset=offset, chunk_size=C)


def naive_recurrent_mlp_memory(q, k, v, alpha, eta, theta, *, chunk_size: int = 16, initial_state=None,
                               output_final_state: bool = False, cu_seqlens=None, activation: str = "silu",
                               residual: bool = False, max_update_norm: float | None = None):
    """Token-by-token reference of the MLP-memory update.

    Each token's gradients come from autograd of its loss (``torch.func.grad``), independently of
    the hand-derived gradients of the dual form and the kernels.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; alpha, eta, theta: ``[B, T, H]``.
        initial_state: ``(W1, W2)``, ``(W1, W2, S1, S2)`` or an :class:`MLPMemoryState`; required
            (an MLP memory needs its initial weights). W1 ``[N or 1, H, K, Dh]``, W2 ``[N or 1, H, Dh, V]``.
        activation: "silu" or "gelu" (exact). residual: add the input to the memory's output (K == V).
        chunk_size, output_final_state, cu_seqlens, max_update_norm: as for the linear memory
            (the write norm is over both layers' gradients, ``sqrt(||G1||^2 + ||G2||^2)``).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; an :class:`MLPMemoryState`
        (float64 when q is float64, else float32) or None.
    """
    shape, C, init, layout, x = _prepare(q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens,
                                         activation, residual, max_update_norm, layout_chunk=1)

    def loss(W1, W2, k_t, v_t):  # summed over rows and heads, whose weights are independent
        y = mlp_forward(k_t.unsqueeze(-2), W1, W2, activation, residual).squeeze(-2)
        return 0.5 * ((y - v_t) ** 2).sum()

    grad = torch.func.grad(loss, argnums=(0, 1))
    valid = layout.valid_mask(q.device)  # [N, L]
    W1, W2, S1, S2, a1, a2 = init.W1, init.W2, init.S1, init.S2, init.anchor1, init.anchor2
    offset = init.offset.clone()
    outs = []
    for t in range(layout.L):
        boundary = at_boundary(offset)
        a1, a2 = torch.where(boundary, W1, a1), torch.where(boundary, W2, a2)
        G1, G2 = grad(a1, a2, x["k"][:, t], x["v"][:, t])
        write_norm = torch.cat([G1.flatten(-2), G2.flatten(-2)], dim=-1).norm(dim=-1)  # [N, H]
        th = clipped_step(x["theta"][:, t], write_norm, max_update_norm)[..., None, None]
        e, a = (x[n][:, t, :, None, None] for n in ("eta", "alpha"))
        S1n, S2n = e * S1 - th * G1, e * S2 - th * G2
        W1n, W2n = (1 - a) * W1 + S1n, (1 - a) * W2 + S2n
        outs.append(mlp_forward(x["q"][:, t].unsqueeze(-2), W1n, W2n, activation, residual).squeeze(-2))
        keep = valid[:, t].view(-1, 1, 1, 1)
        W1, W2 = torch.where(keep, W1n, W1), torch.where(keep, W2n, W2)
        S1, S2 = torch.where(keep, S1n, S1), torch.where(keep, S2n, S2)
        offset = torch.where(valid[:, t], (offset + 1) % C, offset)
    o = torch.stack(outs, dim=1) if outs else x["v"].new_zeros(shape.N, 0, shape.H, shape.V)
    o = from_padded(o, layout, shape.B).to(q.dtype)
    return o, (_final_state(W1, W2, S1, S2, a1, a2, offset, C) if output_final_state else None)


@traceable("mlp_memory", "naive_chunk")
def naive_chunk_mlp_memory(q, k, v, alpha, eta, theta, *, chunk_size: int = 16, initial_state=None,
                           output_final_state: bool = False, cu_seqlens=None, activation: str = "silu",
                           residual: bool = False, max_update_norm: float | None = None):
    """Dual (chunked) form of the MLP-memory update in vectorised PyTorch.

    Same arguments, returns and results as :func:`naive_recurrent_mlp_memory`; each chunk is a
    handful of batched matmuls against its start weights plus causal coefficient matrices built
    from the gates (module docstring). Differentiable by autograd; the CPU execution path.
    """
    shape, C, init, layout, x = _prepare(q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens,
                                         activation, residual, max_update_norm, layout_chunk=chunk_size)
    N, L, H = shape.N, layout.L, shape.H
    NC = L // C
    Q, Kc, Vc = (to_chunks(x[n], C) for n in ("q", "k", "v"))  # [N, H, NC, C, K|V]
    th = to_chunks(x["theta"], C)[..., None]  # [N, H, NC, C, 1]
    m = to_chunks(layout.valid_mask(q.device).unsqueeze(-1).expand(N, L, H).to(Q.dtype), C)  # [N, H, NC, C]
    gates = chunk_gates(to_chunks(x["alpha"], C), to_chunks(x["eta"], C), m)
    A, Bv, E = gates.A[..., None], gates.B[..., None], gates.E  # [N, H, NC, C, 1], [N, H, NC, C]
    P1 = (Q @ Kc.transpose(-1, -2)) * gates.Gamma  # [N, H, NC, C, C]

    W1, W2, S1, S2, a1, a2 = init.W1, init.W2, init.S1, init.S2, init.anchor1, init.anchor2
    lengths = sequence_lengths(shape.B, shape.T, cu_seqlens)
    last_chunk = torch.tensor([(o + n) // C for o, n in zip(init.offsets, lengths)], device=q.device).view(-1, 1, 1, 1)
    final_a1, final_a2 = a1, a2
    outs = []
    for n in range(NC):
        if n > 0:
            a1, a2 = W1, W2
        ends_here = last_chunk == n
        final_a1, final_a2 = torch.where(ends_here, a1, final_a1), torch.where(ends_here, a2, final_a2)
        Kn, Qn = Kc[:, :, n], Q[:, :, n]  # [N, H, C, K]
        Z = Kn @ a1  # [N, H, C, Dh]
        Hk = act(Z, activation)
        Err = Hk @ a2 + (Kn if residual else 0) - Vc[:, :, n]  # [N, H, C, V]
        Delta = (Err @ a2.transpose(-1, -2)) * act_grad(Z, activation)  # [N, H, C, Dh]
        step = th[:, :, n]  # [N, H, C, 1]
        if max_update_norm is not None:  # ||G_t||^2 = |k|^2 |delta|^2 + |h|^2 |err|^2 (rank-one gradients)
            write_norm = torch.stack([Kn.norm(dim=-1) * Delta.norm(dim=-1), Hk.norm(dim=-1) * Err.norm(dim=-1)],
                                     dim=-1).norm(dim=-1)  # [N, H, C]
            step = clipped_step(step[..., 0], write_norm, max_update_norm)[..., None]
        X1, X2 = step * Delta, step * Err
        Gam = gates.Gamma[:, :, n]
        Zq = A[:, :, n] * (Qn @ W1) + Bv[:, :, n] * (Qn @ S1) - P1[:, :, n] @ X1
        Hq = act(Zq, activation)
        o = A[:, :, n] * (Hq @ W2) + Bv[:, :, n] * (Hq @ S2) - ((Hq @ Hk.transpose(-1, -2)) * Gam) @ X2
        outs.append(o + Qn if residual else o)
        g, h = gates.g[:, :, n], gates.h[:, :, n]  # [N, H, C, 1]
        A_c, B_c, E_c = A[:, :, n, -1, :, None], Bv[:, :, n, -1, :, None], E[:, :, n, -1, None, None]
        Kt, Ht = Kn.transpose(-1, -2), Hk.transpose(-1, -2)
        W1, S1 = A_c * W1 + B_c * S1 - Kt @ (g * X1), E_c * S1 - Kt @ (h * X1)
        W2, S2 = A_c * W2 + B_c * S2 - Ht @ (g * X2), E_c * S2 - Ht @ (h * X2)
    o = torch.stack(outs, dim=2) if outs else x["v"].new_zeros(N, H, 0, C, shape.V)  # [N, H, NC, C, V]
    o = from_padded(o.reshape(N, H, L, shape.V).transpose(1, 2), layout, shape.B).to(q.dtype)
    if not output_final_state:
        return o, None
    offset = (init.offset + torch.tensor(lengths, device=q.device)) % C
    return o, _final_state(W1, W2, S1, S2, final_a1, final_a2, offset, C)
