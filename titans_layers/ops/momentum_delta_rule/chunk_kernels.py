"""Triton chunkwise forward and backward kernels of the linear-memory update.

Design. One program per (block of V columns, sequence, head) walks its sequence tile by tile
with the state ``(M, S, anchor)`` ``[K, BV]`` in registers; V columns of the linear memory are
independent, so V blocks never talk. A tile holds BT tokens (BT divides the chunk size C): a
tile inside a chunk is a continuation from the middle of the chunk, which the chunked form of
``naive.py`` takes as it is (the anchor stays, ``(M, S)`` are the current state), so chunk 64
runs as two tiles of 32 and on-chip memory depends on BT, not on C. Segment products come from
a cumulative product: no division, exact at gates 0 and 1. A sequence that starts mid-chunk (a
state with ``offset > 0``) or ends mid-tile is padded inside the tile with tokens that write
nothing, so the last row of a tile is the state after its last real token.

The forward stores the state at the start of every tile (two ``[K, V]`` float32 tensors per
tile: memory O(T (K + V)) plus one state per tile); the backward walks the tiles in reverse,
reloads each tile's start state (and its chunk's anchor, the start state of the chunk's first
tile), recomputes the tile and carries the adjoints of ``(M, S, anchor)``.
Gradients of q, k and the gates sum over V blocks: each block writes its own partial, summed
afterwards (deterministic, no atomics).

Update clipping (``max_update_norm = c``, :mod:`titans_layers.ops.common.clipping`), under the
constexpr flag ``CLIP`` (compiled out, no cost, when off). Token t's step becomes
``theta'_t = c / n_t`` where ``theta_t n_t > c``, else ``theta_t``, with
``n_t = ||G_t||_F = |k_t| |e_t|`` and ``e_t = k_t W_anchor - v_t`` the error row at the chunk's
anchor (the tile's ``U``), computed as ``sqrt(|k|^2) * sqrt(|e|^2)`` (correctly rounded square
roots; no overflow of the product of squares). The division happens only in the branch taken
(``clip_step``), so zero keys, zero errors and theta = 0 stay finite and exact; theta' replaces
theta everywhere theta was used.

- One program holds all of V. ``|e_t|`` sums over all of V, so a program holding a block of V
  columns cannot clip alone (and V blocks have no way to exchange partial sums mid-sequence: the
  anchor, hence ``e``, depends on every earlier clip decision; in the backward the clip adjoint
  of each token needs ``dtheta'``, a sum over all of V). With ``CLIP`` the forward and the decode
  kernel use a single V block (NV = 1, BV = next power of 2 of V, V <= 128): the state tiles grow
  from ``[K, <=64]`` to ``[K, V]`` (the decode kernel takes more warps beyond 64 x 64,
  ``chunk.decode_warps``), so at large heads a clipped call keeps up to 4x more state per program
  and runs fewer programs than an unclipped one. The backward does the same up to
  ``CLIP_BWD_MAX_TILE`` (64 x 64) state elements; beyond, one block would need more shared memory
  than an A100/H100 has, so ``chunk_split_kernels.chunk_momentum_delta_rule_bwd_split_kernel``
  walks V in sub-blocks of the unclipped width, with the adjoint state in global memory and two
  passes per tile. On a GPU with 99 KB of shared memory a block (sm_86, sm_89, sm_120) the forward
  above K = V = 64 likewise takes ``chunk_momentum_delta_rule_fwd_split_kernel``, and the backward
  narrower sub-blocks: each launch is the first of ``chunk.forward_candidates`` /
  ``chunk.backward_candidates`` that fits. With a bound that never bites the results equal the
  unclipped kernel's bit for bit when V fits one block anyway (V <= 64, or <= 32 for K > 64);
  otherwise only the summation order of the V-block partials of dq, dk and the gates differs.
  Shared memory, registers and spills of each launch: docs/kernels.md.
- Saved norms. The forward stores each token's ``n_t`` in a ``[B*T, H]`` float32 buffer next to
  the tile states; the backward reloads it and re-derives ``theta'`` with the same helper, so the
  clip decision (a discontinuity of the gradient) is the forward's bit for bit even where the
  backward's recomputed ``e`` rounds differently (on a GPU the two kernels' ``tl.dot`` need not
  round alike). The norm's derivatives use the backward's recomputed ``|k|^2`` and ``|e|^2``.
- Backward. The tile backward yields the adjoint ``dtheta'`` of the used step. Unclipped tokens:
  ``dtheta = dtheta'``. Clipped tokens: ``dtheta = 0`` (theta' = c / n does not depend on theta)
  and ``dn = -dtheta' theta' / n``; with ``w = dn / n``: ``dk += w |e|^2 k`` directly, and
  ``de += w |k|^2 e``, which joins the adjoint of ``U`` before it flows into ``dk (dU W^T)``,
  ``dv (-dU)`` and the anchor's adjoint ``(k^T dU)``. Both additions sit behind
  ``where(clipped, ...)`` so unclipped rows keep their exact bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from titans_layers.ops.common.triton_utils import clip_step, gate_grads, mm, sequence_range, take, tile_gates


@triton.jit
def sequence_bounds(cu_seqlens, tile_indptr, offset, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Token range [bos, eos) of sequence i_n; its offset into the first chunk; the index j0 of
    its first tile counted from the chunk start before bos; its tile count; and the index of its
    first tile in the per-tile buffers. Tile j covers positions bos - off + j * BT + [0, BT)."""
    bos, eos = sequence_range(cu_seqlens, i_n, T, IS_VARLEN)
    off = tl.load(offset + i_n).to(tl.int64)
    j0 = off // BT
    n_tiles = (off + eos - bos + BT - 1) // BT - j0
    first_tile = tl.load(tile_indptr + i_n).to(tl.int64)
    return bos, eos, off, j0, n_tiles, first_tile


@triton.jit
def load_tile(q, k, v, alpha, eta, theta, p, valid, h, H, K, V, rk, rv, mk, mv):
    """Inputs of one tile at token positions p [BT]; padding rows write nothing."""
    q_ptrs = (p[:, None] * H + h) * K + rk[None, :]
    b_q = tl.load(q + q_ptrs, mask=valid[:, None] & mk[None, :], other=0.0).to(tl.float32)  # [BT, BK]
    b_k = tl.load(k + q_ptrs, mask=valid[:, None] & mk[None, :], other=0.0).to(tl.float32)  # [BT, BK]
    b_v = tl.load(v + (p[:, None] * H + h) * V + rv[None, :], mask=valid[:, None] & mv[None, :],
                  other=0.0).to(tl.float32)  # [BT, BV]
    g_ptrs = p * H + h
    b_a = 1.0 - tl.load(alpha + g_ptrs, mask=valid, other=0.0).to(tl.float32)  # [BT]
    b_e = tl.load(eta + g_ptrs, mask=valid, other=1.0).to(tl.float32)  # [BT]
    b_th = tl.load(theta + g_ptrs, mask=valid, other=0.0).to(tl.float32)  # [BT]
    return b_q, b_k, b_v, b_a, b_e, b_th


@triton.jit
def load_token(q, k, v, alpha, eta, theta, t, h, H, K, V, rk, rv, mk, mv):
    """Inputs of token t, head h, for the decode kernels: q, k ``[BK]``, v ``[BV]`` and the gates
    ``a = 1 - alpha``, ``eta``, ``theta`` as float32."""
    b_q = tl.load(q + (t * H + h) * K + rk, mask=mk, other=0.0).to(tl.float32)  # [BK]
    b_k = tl.load(k + (t * H + h) * K + rk, mask=mk, other=0.0).to(tl.float32)  # [BK]
    b_v = tl.load(v + (t * H + h) * V + rv, mask=mv, other=0.0).to(tl.float32)  # [BV]
    b_a = 1.0 - tl.load(alpha + t * H + h).to(tl.float32)
    b_e = tl.load(eta + t * H + h).to(tl.float32)
    b_th = tl.load(theta + t * H + h).to(tl.float32)
    return b_q, b_k, b_v, b_a, b_e, b_th


@triton.jit
def write_norm(kk, ee):
    """``||G_t||_F = |k_t| |e_t|`` from the squared norms (``[BT]``, or scalars)."""
    return tl.sqrt_rn(kk) * tl.sqrt_rn(ee)


@triton.jit
def chunk_momentum_delta_rule_fwd_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    M0, S0, W0, offset,  # initial state [N, H, K, V] float32, offset [N]
    cu_seqlens, tile_indptr,  # [N + 1]
    o,  # [B*T, H, V]
    MT, ST, WT,  # final state [N, H, K, V] float32
    tile_M, tile_S,  # [total tiles, H, K, V] float32 (tile-start states)
    norms,  # [B*T, H] float32: each token's ||G_t|| (written when CLIP and STORE_TILES)
    T, max_norm,  # sequence length; the bound c on each write (read when CLIP)
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_TILES: tl.constexpr,
    PRECISION: tl.constexpr, CLIP: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, h = i_nh // H, i_nh % H
    bos, eos, off, j0, n_tiles, first_tile = sequence_bounds(cu_seqlens, tile_indptr, offset, i_n, T, BT, IS_VARLEN)
    R: tl.constexpr = C // BT  # tiles per chunk

    r = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    s_off = ((i_n * H + h) * K + rk[:, None]).to(tl.int64) * V + rv[None, :]  # [BK, BV]
    s_mask = mk[:, None] & mv[None, :]
    b_M = tl.load(M0 + s_off, mask=s_mask, other=0.0)  # [BK, BV]
    b_S = tl.load(S0 + s_off, mask=s_mask, other=0.0)
    b_W = tl.load(W0 + s_off, mask=s_mask, other=0.0)  # anchor of the current chunk
    for i in range(n_tiles):
        j = j0 + i
        b_W = tl.where((j % R == 0) & (i > 0), b_M, b_W)  # a new chunk anchors at the current weights
        p = bos - off + j * BT + r  # [BT] token positions (int64)
        valid = (p >= bos) & (p < eos)
        b_q, b_k, b_v, b_a, b_e, b_th = load_tile(q, k, v, alpha, eta, theta, p, valid, h, H, K, V, rk, rv, mk, mv)
        m = valid.to(tl.float32)
        if STORE_TILES:
            t_off = ((first_tile + i) * H + h) * K * V + (rk[:, None] * V + rv[None, :])
            tl.store(tile_M + t_off, b_M, mask=s_mask)
            tl.store(tile_S + t_off, b_S, mask=s_mask)

        D_a, D_e, A, E, Gam, Bv, g, hh = tile_gates(b_a, b_e, m, r, BT)  # [BT, BT] and [BT]

        b_U = mm(b_k, b_W, PRECISION) - b_v  # [BT, BV] errors at the anchor
        if CLIP:  # one V block holds all of V: the norms are complete
            b_norm = write_norm(tl.sum(b_k * b_k, axis=1), tl.sum(b_U * b_U, axis=1))  # [BT]
            b_th, _ = clip_step(b_th, b_norm, max_norm)
            if STORE_TILES:
                tl.store(norms + p * H + h, b_norm, mask=valid)
        b_X = b_th[:, None] * b_U  # [BT, BV]
        b_P = mm(b_q, tl.trans(b_k), PRECISION) * Gam  # [BT, BT]
        b_o = A[:, None] * mm(b_q, b_M, PRECISION) \
            + Bv[:, None] * mm(b_q, b_S, PRECISION) \
            - mm(b_P, b_X, PRECISION)
        tl.store(o + (p[:, None] * H + h) * V + rv[None, :], b_o.to(o.dtype.element_ty),
                 mask=valid[:, None] & mv[None, :])

        b_kT = tl.trans(b_k)  # [BK, BT]
        b_M_next = take(A, r, BT - 1) * b_M + take(Bv, r, BT - 1) * b_S \
            - mm(b_kT, g[:, None] * b_X, PRECISION)
        b_S = take(E, r, BT - 1) * b_S - mm(b_kT, hh[:, None] * b_X, PRECISION)
        b_M = b_M_next

    # the anchor to hand on: the last chunk's, unless the sequence ends on a chunk boundary
    ends_mid_chunk = (off + eos - bos) % C != 0
    tl.store(MT + s_off, b_M, mask=s_mask)
    tl.store(ST + s_off, b_S, mask=s_mask)
    tl.store(WT + s_off, tl.where(ends_mid_chunk, b_W, b_M), mask=s_mask)


@triton.jit
def chunk_momentum_delta_rule_bwd_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    W0, offset, cu_seqlens, tile_indptr,  # initial anchor [N, H, K, V]; offset [N]; [N + 1]; [N + 1]
    tile_M, tile_S,  # [total tiles, H, K, V] float32 tile-start states from the forward
    do, dMT, dST, dWT,  # [B*T, H, V]; gradients of the final state [N, H, K, V] float32
    dq, dk,  # [NV, B*T, H, K] float32 partials over V blocks
    dv,  # [B*T, H, V]
    dalpha, deta, dtheta,  # [NV, B*T, H] float32 partials
    dM0, dS0, dW0,  # [N, H, K, V] float32
    norms,  # [B*T, H] float32: the forward's ||G_t|| per token (read when CLIP)
    T, n_tokens,  # sequence length (unpacked input); B*T, the rows of one V block's partial
    max_norm,  # the bound c on each write (read when CLIP)
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    CLIP: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, h = i_nh // H, i_nh % H
    bos, eos, off, j0, n_tiles, first_tile = sequence_bounds(cu_seqlens, tile_indptr, offset, i_n, T, BT, IS_VARLEN)
    R: tl.constexpr = C // BT
    r = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    s_off = ((i_n * H + h) * K + rk[:, None]).to(tl.int64) * V + rv[None, :]  # [BK, BV]
    s_mask = mk[:, None] & mv[None, :]
    lower = r[:, None] >= r[None, :]
    last_row = r[:, None] == BT - 1
    is_last = r == BT - 1
    part = i_v.to(tl.int64) * n_tokens * H  # this V block's slice of the partial buffers

    ends_mid_chunk = (off + eos - bos) % C != 0
    b_dWT = tl.load(dWT + s_off, mask=s_mask, other=0.0)
    b_dM = tl.load(dMT + s_off, mask=s_mask, other=0.0) + tl.where(ends_mid_chunk, 0.0, b_dWT)
    b_dS = tl.load(dST + s_off, mask=s_mask, other=0.0)
    b_dW = tl.where(ends_mid_chunk, b_dWT, 0.0)  # adjoint of the current chunk's anchor
    for ii in range(n_tiles):
        i = n_tiles - 1 - ii
        j = j0 + i
        p = bos - off + j * BT + r
        valid = (p >= bos) & (p < eos)
        b_q, b_k, b_v, b_a, b_e, b_th = load_tile(q, k, v, alpha, eta, theta, p, valid, h, H, K, V, rk, rv, mk, mv)
        m = valid.to(tl.float32)
        prev_valid = valid & (r > 0) & (p - 1 >= bos)
        a_prev = 1.0 - tl.load(alpha + (p - 1) * H + h, mask=prev_valid, other=0.0).to(tl.float32)
        e_prev = tl.load(eta + (p - 1) * H + h, mask=prev_valid, other=1.0).to(tl.float32)
        t_off = ((first_tile + i) * H + h) * K * V + (rk[:, None] * V + rv[None, :])
        b_M = tl.load(tile_M + t_off, mask=s_mask, other=0.0)  # [BK, BV] state at the tile start
        b_S = tl.load(tile_S + t_off, mask=s_mask, other=0.0)
        if j < R:  # the first chunk keeps the initial anchor
            b_W = tl.load(W0 + s_off, mask=s_mask, other=0.0)
        else:  # later chunks anchor at the start state of their first tile
            w_off = ((first_tile + (j // R) * R - j0) * H + h) * K * V + (rk[:, None] * V + rv[None, :])
            b_W = tl.load(tile_M + w_off, mask=s_mask, other=0.0)

        # recompute the tile
        D_a, D_e, A, E, Gam, Bv, g, hh = tile_gates(b_a, b_e, m, r, BT)  # [BT, BT] and [BT]
        D_em = D_e * m[:, None]
        Em = E * m
        A_c, B_c, E_c = take(A, r, BT - 1), take(Bv, r, BT - 1), take(E, r, BT - 1)
        b_QK = mm(b_q, tl.trans(b_k), PRECISION)  # [BT, BT]
        b_U = mm(b_k, b_W, PRECISION) - b_v  # [BT, BV]
        if CLIP:  # the forward's norms: the same clip decisions, bit for bit
            b_norm = tl.load(norms + p * H + h, mask=valid, other=0.0)  # [BT]
            b_th, clipped = clip_step(b_th, b_norm, max_norm)
        b_X = b_th[:, None] * b_U
        b_QM = mm(b_q, b_M, PRECISION)
        b_QS = mm(b_q, b_S, PRECISION)
        b_do = tl.load(do + (p[:, None] * H + h) * V + rv[None, :], mask=valid[:, None] & mv[None, :],
                       other=0.0).to(tl.float32)  # [BT, BV]

        # through O = A (Q M) + B (Q S) - (QK * Gamma) X and the tile-end state
        dA = tl.sum(b_do * b_QM, axis=1) + tl.where(is_last, tl.sum(b_dM * b_M), 0.0)  # [BT]
        dBv = tl.sum(b_do * b_QS, axis=1) + tl.where(is_last, tl.sum(b_dM * b_S), 0.0)
        dE_c = tl.sum(b_dS * b_S)
        dP = tl.where(lower, -mm(b_do, tl.trans(b_X), PRECISION), 0.0)  # [BT, BT]
        b_KdM = mm(b_k, b_dM, PRECISION)  # [BT, BV]
        b_KdS = mm(b_k, b_dS, PRECISION)
        b_dX = -mm(tl.trans(b_QK * Gam), b_do, PRECISION) \
            - g[:, None] * b_KdM - hh[:, None] * b_KdS
        dg = -tl.sum(b_X * b_KdM, axis=1)
        dh = -tl.sum(b_X * b_KdS, axis=1)
        b_dU = b_th[:, None] * b_dX
        dth = tl.sum(b_dX * b_U, axis=1)  # adjoint of the step used (theta' when clipping)
        if CLIP:
            # clipped: theta' = c / n, so dtheta = 0 and dn = -dtheta' theta' / n; w = dn / n.
            # n = |k| |e|: dk += w |e|^2 k, de += w |k|^2 e (de joins dU: dk, dv, the anchor)
            safe = tl.where(clipped, b_norm, 1.0)
            w = tl.where(clipped, -dth * (b_th / safe) / safe, 0.0)  # [BT]
            b_dU = tl.where(clipped[:, None], b_dU + (w * tl.sum(b_k * b_k, axis=1))[:, None] * b_U, b_dU)
            dth = tl.where(clipped, 0.0, dth)
        dQK = dP * Gam
        dGam = dP * b_QK + tl.where(last_row, dg[None, :], 0.0)

        b_dq = mm(dQK, b_k, PRECISION) \
            + A[:, None] * mm(b_do, tl.trans(b_M), PRECISION) \
            + Bv[:, None] * mm(b_do, tl.trans(b_S), PRECISION)
        b_dk = mm(tl.trans(dQK), b_q, PRECISION) \
            - mm(g[:, None] * b_X, tl.trans(b_dM), PRECISION) \
            - mm(hh[:, None] * b_X, tl.trans(b_dS), PRECISION) \
            + mm(b_dU, tl.trans(b_W), PRECISION)
        if CLIP:
            b_dk = tl.where(clipped[:, None], b_dk + (w * tl.sum(b_U * b_U, axis=1))[:, None] * b_k, b_dk)
        b_dW = b_dW + mm(tl.trans(b_k), b_dU, PRECISION)
        b_dM_start = mm(tl.trans(A[:, None] * b_q), b_do, PRECISION) + A_c * b_dM
        b_dS = mm(tl.trans(Bv[:, None] * b_q), b_do, PRECISION) + B_c * b_dM + E_c * b_dS

        # gates: Gamma = D_a (m D_e), B = D_a (m E), A = cumprod(a), E = cumprod(e)
        da, de = gate_grads(dGam, dA, dBv, dE_c, dh, D_a, D_e, D_em, Em, m, a_prev, e_prev, r, last_row, is_last)

        tok_k = (p[:, None] * H + h) * K + rk[None, :]
        tl.store(dq + part * K + tok_k, b_dq, mask=valid[:, None] & mk[None, :])
        tl.store(dk + part * K + tok_k, b_dk, mask=valid[:, None] & mk[None, :])
        tl.store(dv + (p[:, None] * H + h) * V + rv[None, :], (-b_dU).to(dv.dtype.element_ty),
                 mask=valid[:, None] & mv[None, :])
        tl.store(dalpha + part + p * H + h, -da, mask=valid)
        tl.store(deta + part + p * H + h, de, mask=valid)
        tl.store(dtheta + part + p * H + h, dth, mask=valid)

        # the previous tile ends where this one starts; at a chunk start it is also the anchor
        chunk_start = (j % R == 0) & (i > 0)
        b_dM = b_dM_start + tl.where(chunk_start, b_dW, 0.0)
        b_dW = tl.where(chunk_start, 0.0, b_dW)
    tl.store(dM0 + s_off, b_dM, mask=s_mask)
    tl.store(dS0 + s_off, b_dS, mask=s_mask)
    tl.store(dW0 + s_off, b_dW, mask=s_mask)
