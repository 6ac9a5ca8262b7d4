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
"""

from __future__ import annotations

import triton
import triton.language as tl

from titans_layers.ops.common.triton_utils import gate_grads, segment_products, sequence_range, take, take_row


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
def chunk_momentum_delta_rule_fwd_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    M0, S0, W0, offset,  # initial state [N, H, K, V] float32, offset [N]
    cu_seqlens, tile_indptr,  # [N + 1]
    o,  # [B*T, H, V]
    MT, ST, WT,  # final state [N, H, K, V] float32
    tile_M, tile_S,  # [total tiles, H, K, V] float32 (tile-start states)
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_TILES: tl.constexpr,
    PRECISION: tl.constexpr,
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

        D_a = segment_products(b_a, r)  # [BT, BT]
        D_e = segment_products(b_e, r)
        A = tl.cumprod(b_a, axis=0)  # [BT]
        E = tl.cumprod(b_e, axis=0)
        Gam = tl.dot(D_a, D_e * m[:, None], input_precision="ieee")  # [BT, BT]
        Bv = tl.sum(D_a * (E * m)[None, :], axis=1)  # [BT]
        g = take_row(Gam, r, BT - 1)
        hh = take_row(D_e, r, BT - 1)

        b_X = b_th[:, None] * (tl.dot(b_k, b_W, input_precision=PRECISION) - b_v)  # [BT, BV]
        b_P = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * Gam  # [BT, BT]
        b_o = A[:, None] * tl.dot(b_q, b_M, input_precision=PRECISION) \
            + Bv[:, None] * tl.dot(b_q, b_S, input_precision=PRECISION) \
            - tl.dot(b_P, b_X, input_precision=PRECISION)
        tl.store(o + (p[:, None] * H + h) * V + rv[None, :], b_o.to(o.dtype.element_ty),
                 mask=valid[:, None] & mv[None, :])

        b_kT = tl.trans(b_k)  # [BK, BT]
        b_M_next = take(A, r, BT - 1) * b_M + take(Bv, r, BT - 1) * b_S \
            - tl.dot(b_kT, g[:, None] * b_X, input_precision=PRECISION)
        b_S = take(E, r, BT - 1) * b_S - tl.dot(b_kT, hh[:, None] * b_X, input_precision=PRECISION)
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
    T, n_tokens,  # sequence length (unpacked input); B*T, the rows of one V block's partial
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
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
        D_a = segment_products(b_a, r)
        D_e = segment_products(b_e, r)
        D_em = D_e * m[:, None]
        A = tl.cumprod(b_a, axis=0)
        E = tl.cumprod(b_e, axis=0)
        Em = E * m
        Gam = tl.dot(D_a, D_em, input_precision="ieee")
        Bv = tl.sum(D_a * Em[None, :], axis=1)
        g = take_row(Gam, r, BT - 1)
        hh = take_row(D_e, r, BT - 1)
        A_c, B_c, E_c = take(A, r, BT - 1), take(Bv, r, BT - 1), take(E, r, BT - 1)
        b_QK = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BT, BT]
        b_U = tl.dot(b_k, b_W, input_precision=PRECISION) - b_v  # [BT, BV]
        b_X = b_th[:, None] * b_U
        b_QM = tl.dot(b_q, b_M, input_precision=PRECISION)
        b_QS = tl.dot(b_q, b_S, input_precision=PRECISION)
        b_do = tl.load(do + (p[:, None] * H + h) * V + rv[None, :], mask=valid[:, None] & mv[None, :],
                       other=0.0).to(tl.float32)  # [BT, BV]

        # through O = A (Q M) + B (Q S) - (QK * Gamma) X and the tile-end state
        dA = tl.sum(b_do * b_QM, axis=1) + tl.where(is_last, tl.sum(b_dM * b_M), 0.0)  # [BT]
        dBv = tl.sum(b_do * b_QS, axis=1) + tl.where(is_last, tl.sum(b_dM * b_S), 0.0)
        dE_c = tl.sum(b_dS * b_S)
        dP = tl.where(lower, -tl.dot(b_do, tl.trans(b_X), input_precision=PRECISION), 0.0)  # [BT, BT]
        b_KdM = tl.dot(b_k, b_dM, input_precision=PRECISION)  # [BT, BV]
        b_KdS = tl.dot(b_k, b_dS, input_precision=PRECISION)
        b_dX = -tl.dot(tl.trans(b_QK * Gam), b_do, input_precision=PRECISION) \
            - g[:, None] * b_KdM - hh[:, None] * b_KdS
        dg = -tl.sum(b_X * b_KdM, axis=1)
        dh = -tl.sum(b_X * b_KdS, axis=1)
        b_dU = b_th[:, None] * b_dX
        dth = tl.sum(b_dX * b_U, axis=1)
        dQK = dP * Gam
        dGam = dP * b_QK + tl.where(last_row, dg[None, :], 0.0)

        b_dq = tl.dot(dQK, b_k, input_precision=PRECISION) \
            + A[:, None] * tl.dot(b_do, tl.trans(b_M), input_precision=PRECISION) \
            + Bv[:, None] * tl.dot(b_do, tl.trans(b_S), input_precision=PRECISION)
        b_dk = tl.dot(tl.trans(dQK), b_q, input_precision=PRECISION) \
            - tl.dot(g[:, None] * b_X, tl.trans(b_dM), input_precision=PRECISION) \
            - tl.dot(hh[:, None] * b_X, tl.trans(b_dS), input_precision=PRECISION) \
            + tl.dot(b_dU, tl.trans(b_W), input_precision=PRECISION)
        b_dW = b_dW + tl.dot(tl.trans(b_k), b_dU, input_precision=PRECISION)
        b_dM_start = tl.dot(tl.trans(A[:, None] * b_q), b_do, input_precision=PRECISION) + A_c * b_dM
        b_dS = tl.dot(tl.trans(Bv[:, None] * b_q), b_do, input_precision=PRECISION) + B_c * b_dM + E_c * b_dS

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
