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

No per-token weight copies: the chunk loop (:mod:`~titans_layers.ops.mlp_memory.dual_form`, with a
hand-written backward) keeps the chunk-start weights, ``2 (K + V) Dh`` floats per chunk and head,
and O(C (K + Dh + V)) per token for the backward.
"""

from __future__ import annotations

import torch

from titans_layers.ops.common.chunk_gates import chunk_gates
from titans_layers.ops.common.clipping import check_max_update_norm, clipped_step
from titans_layers.ops.common.grad_mode import needs_grad
from titans_layers.ops.common.layout import from_padded, make_layout, pad_op_inputs, sequence_lengths, to_chunks
from titans_layers.ops.common.state_io import at_boundary
from titans_layers.ops.common.autocast import without_autocast
from titans_layers.ops.common.traceable import traceable
from titans_layers.ops.common.validation import check_chunk_size, check_op_inputs, compute_dtype
from titans_layers.ops.mlp_memory.activations import ACTIVATIONS, act
from titans_layers.ops.mlp_memory.dual_form import MLPDualForm
from titans_layers.ops.mlp_memory.state import MLPMemoryState, resolve_mlp_state


def check_mlp_options(activation, residual, K: int, V: int) -> None:
    """Raise unless ``activation`` is known and ``residual`` fits the head dims."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"`residual` must be a bool, got {type(residual).__name__}")
    if residual and K != V:
        raise ValueError(f"`residual=True` adds the key to the memory's output and needs K == V, got K = {K}, V = {V}")


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


def _chunk_major(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[N, L, H, *rest]`` -> ``[L / C, N, H, C, *rest]``, contiguous (the dual form's layout)."""
    return to_chunks(x, chunk_size).movedim(2, 0).contiguous()


@without_autocast
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
    from the gates (module docstring). The chunk loop is
    :class:`~titans_layers.ops.mlp_memory.dual_form.MLPDualForm`, with a hand-written backward
    (once differentiable); the CPU execution path.
    """
    shape, C, init, layout, x = _prepare(q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens,
                                         activation, residual, max_update_norm, layout_chunk=chunk_size)
    N, L, H = shape.N, layout.L, shape.H
    lengths = sequence_lengths(shape.B, shape.T, cu_seqlens)
    offset = (init.offset + torch.tensor(lengths, device=q.device)) % C
    if L == 0:  # no tokens at all: the state passes through
        o = x["v"].new_zeros(shape.B, shape.T, H, shape.V).to(q.dtype)
        state = _final_state(init.W1, init.W2, init.S1, init.S2, init.anchor1, init.anchor2, offset, C)
        return o, (state if output_final_state else None)
    Q, Kc, Vc, theta = (_chunk_major(x[n], C) for n in ("q", "k", "v", "theta"))  # [NC, N, H, C, *]
    m = _chunk_major(layout.valid_mask(q.device).unsqueeze(-1).expand(N, L, H).to(Q.dtype), C)  # [NC, N, H, C]
    gates = chunk_gates(_chunk_major(x["alpha"], C), _chunk_major(x["eta"], C), m)
    last_chunk = [(o + n) // C for o, n in zip(init.offsets, lengths)]
    tensors = (Q, Kc, Vc, theta, gates.A, gates.B, gates.E, gates.Gamma, gates.h.squeeze(-1), init.W1, init.S1,
               init.W2, init.S2, init.anchor1, init.anchor2)
    o, W1, S1, W2, S2, a1, a2 = MLPDualForm.apply(*tensors, last_chunk, activation, residual, max_update_norm,
                                                  needs_grad(*tensors))  # o [NC, N, H, C, V]
    o = from_padded(o.permute(1, 0, 3, 2, 4).reshape(N, L, H, shape.V), layout, shape.B).to(q.dtype)
    return o, (_final_state(W1, W2, S1, S2, a1, a2, offset, C) if output_final_state else None)
