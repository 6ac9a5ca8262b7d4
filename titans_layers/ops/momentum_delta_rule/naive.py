"""Plain-PyTorch implementations of the linear-memory update: the per-token reference and the
vectorised chunked form (the CPU execution path).

Per sequence and head, with memory ``f(x; M) = x @ M`` (M ``[K, V]``) and chunk size C::

    G_t = k_t^T (k_t @ W_anchor - v_t)        W_anchor = M at the last chunk boundary
    S_t = eta_t * S_{t-1} - theta_t * G_t
    M_t = (1 - alpha_t) * M_{t-1} + S_t
    o_t = q_t @ M_t

Chunked form. Inside one chunk every gradient is taken at the same anchor, so with
``a = 1 - alpha``, ``e = eta``, ``U = K @ W_anchor - V`` and ``X = theta * U`` (rows ``[C, V]``)::

    D_a[t, i] = prod_{l=i+1..t} a_l,   D_e[i, j] = prod_{l=j+1..i} e_l      (lower-triangular)
    A = cumprod(a),  E = cumprod(e),  B = D_a @ E,  Gamma = D_a @ D_e
    O   = A * (Q @ M_0) + B * (Q @ S_0) - ((Q @ K^T) * Gamma) @ X
    M_C = A_C M_0 + B_C S_0 - K^T (Gamma[C] * X)
    S_C = E_C S_0         - K^T (D_e[C]   * X)

No triangular solve (unlike the delta rule) and no division by gate products.

Partial chunks (a sequence continuing a state mid-chunk, or ending mid-chunk) are padded with
tokens that write nothing: q = k = v = 0, theta = 0, alpha = 0, eta = 1, and their momentum is
masked out of the weight update (``M_t = a_t M_{t-1} + m_t S_t`` with m = 0 on padding), which in
the chunk form means ``B = D_a @ (m * E)`` and ``Gamma = D_a @ (m[:, None] * D_e)``. The last row
of a padded chunk is then exactly the state after its last real token.
"""

from __future__ import annotations

import torch

from titans_layers.ops.common.chunk_gates import chunk_gates
from titans_layers.ops.common.clipping import check_max_update_norm, clipped_step
from titans_layers.ops.common.layout import from_padded, make_layout, pad_op_inputs, sequence_lengths, to_chunks
from titans_layers.ops.common.state_io import at_boundary
from titans_layers.ops.common.autocast import without_autocast
from titans_layers.ops.common.traceable import traceable
from titans_layers.ops.common.validation import check_chunk_size, check_op_inputs, compute_dtype
from titans_layers.ops.momentum_delta_rule.state import MomentumDeltaRuleState, resolve_initial_state

def _final_anchor(M, anchor, offset_final):
    """The anchor to hand on: M itself when the sequence ends on a chunk boundary."""
    return torch.where(at_boundary(offset_final), M, anchor)


@without_autocast
def naive_recurrent_momentum_delta_rule(q, k, v, alpha, eta, theta, *, chunk_size: int = 16, initial_state=None,
                                        output_final_state: bool = False, cu_seqlens=None,
                                        max_update_norm: float | None = None):
    """Token-by-token reference of the gated momentum-delta update (linear memory).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. alpha, eta, theta: ``[B, T, H]``.
        chunk_size: C >= 1; gradients are taken at the weights of the last chunk boundary.
        initial_state: None, ``(M,)``, ``(M, S)`` or a :class:`MomentumDeltaRuleState`.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B == 1), or None.
        max_update_norm: None, or a bound on each token's write ``||theta_t G_t||_F``
            (:mod:`titans_layers.ops.common.clipping`).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state a
        :class:`MomentumDeltaRuleState` (float64 when q is float64, else float32) or None.
    """
    shape = check_op_inputs(q, k, v, alpha, eta, theta, cu_seqlens)
    C = check_chunk_size(chunk_size)
    clip = check_max_update_norm(max_update_norm)
    dtype = compute_dtype(q)
    init = resolve_initial_state(initial_state, shape, C, q.device, dtype)
    layout = make_layout(shape.B, shape.T, cu_seqlens, [0] * shape.N, 1, q.device)
    x = pad_op_inputs(dict(q=q, k=k, v=v, alpha=alpha, eta=eta, theta=theta), layout, dtype)
    valid = layout.valid if layout.valid is not None else torch.ones(shape.N, layout.L, dtype=torch.bool,
                                                                     device=q.device)
    M, S, anchor, offset = init.M, init.S, init.anchor, init.offset.clone()
    outs = []
    for t in range(layout.L):
        anchor = torch.where(at_boundary(offset), M, anchor)
        k_t, v_t, q_t = x["k"][:, t], x["v"][:, t], x["q"][:, t]  # [N, H, K], [N, H, V], [N, H, K]
        u = torch.einsum("nhk,nhkv->nhv", k_t, anchor) - v_t  # [N, H, V]
        G = k_t.unsqueeze(-1) * u.unsqueeze(-2)  # [N, H, K, V]
        step = clipped_step(x["theta"][:, t], G.flatten(-2).norm(dim=-1), clip)  # [N, H]
        S_new = x["eta"][:, t, :, None, None] * S - step[:, :, None, None] * G
        M_new = (1 - x["alpha"][:, t, :, None, None]) * M + S_new
        outs.append(torch.einsum("nhk,nhkv->nhv", q_t, M_new))
        keep = valid[:, t].view(-1, 1, 1, 1)
        M, S = torch.where(keep, M_new, M), torch.where(keep, S_new, S)
        offset = torch.where(valid[:, t], (offset + 1) % C, offset)
    o = torch.stack(outs, dim=1) if outs else x["v"].new_zeros(shape.N, 0, shape.H, shape.V)
    o = from_padded(o, layout, shape.B).to(q.dtype)
    if not output_final_state:
        return o, None
    return o, MomentumDeltaRuleState(M=M, S=S, anchor=_final_anchor(M, anchor, offset), offset=offset, chunk_size=C)


@traceable("momentum_delta_rule", "naive_chunk")
def naive_chunk_momentum_delta_rule(q, k, v, alpha, eta, theta, *, chunk_size: int = 16, initial_state=None,
                                    output_final_state: bool = False, cu_seqlens=None,
                                    max_update_norm: float | None = None):
    """Chunked (dual) form of the gated momentum-delta update in vectorised PyTorch.

    Same arguments, returns and results as :func:`naive_recurrent_momentum_delta_rule`; all
    intra-chunk work is batched matmuls over every chunk at once, and only the chunk-to-chunk
    state passing is a loop. Differentiable by autograd; the CPU execution path of the layers.
    """
    shape = check_op_inputs(q, k, v, alpha, eta, theta, cu_seqlens)
    C = check_chunk_size(chunk_size)
    clip = check_max_update_norm(max_update_norm)
    dtype = compute_dtype(q)
    init = resolve_initial_state(initial_state, shape, C, q.device, dtype)
    layout = make_layout(shape.B, shape.T, cu_seqlens, init.offsets, C, q.device)
    N, L, H = shape.N, layout.L, shape.H
    NC = L // C
    x = pad_op_inputs(dict(q=q, k=k, v=v, alpha=alpha, eta=eta, theta=theta), layout, dtype)

    Q, Kc, Vc = (to_chunks(x[n], C) for n in ("q", "k", "v"))  # [N, H, NC, C, K|V]
    th = to_chunks(x["theta"], C)  # [N, H, NC, C]
    m = to_chunks(layout.valid_mask(q.device).unsqueeze(-1).expand(N, L, H).to(dtype), C)  # [N, H, NC, C]
    gates = chunk_gates(to_chunks(x["alpha"], C), to_chunks(x["eta"], C), m)
    A, Bv, E, Gamma, g, h = gates.A, gates.B, gates.E, gates.Gamma, gates.g, gates.h
    P = (Q @ Kc.transpose(-1, -2)) * Gamma  # [N, H, NC, C, C]

    M, S, anchor = init.M, init.S, init.anchor
    lengths = sequence_lengths(shape.B, shape.T, cu_seqlens)
    # chunk in which each sequence ends: its anchor is the one to hand on
    last_chunk = torch.tensor([(o + n) // C for o, n in zip(init.offsets, lengths)], device=q.device).view(-1, 1, 1, 1)
    final_anchor = anchor
    outs = []
    for n in range(NC):
        if n > 0:
            anchor = M
        final_anchor = torch.where(last_chunk == n, anchor, final_anchor)
        U = Kc[:, :, n] @ anchor - Vc[:, :, n]  # [N, H, C, V] errors at the anchor
        step = th[:, :, n]  # [N, H, C]
        if clip is not None:  # ||G_t|| = |k| |u|
            step = clipped_step(step, Kc[:, :, n].norm(dim=-1) * U.norm(dim=-1), clip)
        X = step[..., None] * U
        outs.append(A[:, :, n, :, None] * (Q[:, :, n] @ M) + Bv[:, :, n, :, None] * (Q[:, :, n] @ S)
                    - P[:, :, n] @ X)
        Kt = Kc[:, :, n].transpose(-1, -2)  # [N, H, K, C]
        M, S = (A[:, :, n, -1, None, None] * M + Bv[:, :, n, -1, None, None] * S - Kt @ (g[:, :, n] * X),
                E[:, :, n, -1, None, None] * S - Kt @ (h[:, :, n] * X))
    o = torch.stack(outs, dim=2) if outs else x["v"].new_zeros(N, H, 0, C, shape.V)  # [N, H, NC, C, V]
    o = o.reshape(N, H, L, shape.V).transpose(1, 2)  # [N, L, H, V]
    o = from_padded(o, layout, shape.B).to(q.dtype)
    if not output_final_state:
        return o, None
    offset = (init.offset + torch.tensor(lengths, device=q.device)) % C
    return o, MomentumDeltaRuleState(M=M, S=S, anchor=_final_anchor(M, final_anchor, offset), offset=offset,
                                     chunk_size=C)

