"""Triton chunk kernels of the linear-memory update that walk V in sub-blocks, for update clipping
where one program must hold all of V but its ``[K, V]`` state tile is more than a block's shared
memory takes (``chunk_kernels`` module docstring, *Update clipping*): one program per (sequence,
head) keeps ``(M, S, anchor)`` or their adjoints in its rows of global ``[N, H, K, V]`` buffers and,
per tile, takes a first pass over the sub-blocks for what sums over all of V (the error norms
``|e_t|^2``; in the backward also ``dtheta'`` and the q, k and gate adjoints), then a second that
updates each sub-block. ``chunk.forward_candidates`` / ``chunk.backward_candidates`` launch them
where the single-block kernels do not fit (beyond ``CLIP_BWD_MAX_TILE`` in the backward; on GPUs
with 99 KB a block, above K = V = 64 in the forward).

Barriers: ``tl.debug_barrier()`` between a sub-block's last load and its first store wherever a
pass rewrites what it read (threads may hold other elements at the load than at the store), and
after every pass that stores what the next one reads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from titans_layers.ops.common.triton_utils import clip_step, gate_grads, mm, take, tile_gates
from titans_layers.ops.momentum_delta_rule.chunk_kernels import sequence_bounds, write_norm


@triton.jit
def load_tile_qk_gates(q, k, alpha, eta, theta, tok_k, p, valid, h, H, mk):
    """A tile's q, k ``[BT, BK]`` (at ``tok_k``), its gates ``a = 1 - alpha``, ``eta``, ``theta`` and
    real-token mask ``[BT]``, float32 (padding rows write nothing); V is read per sub-block."""
    b_q = tl.load(q + tok_k, mask=valid[:, None] & mk[None, :], other=0.0).to(tl.float32)  # [BT, BK]
    b_k = tl.load(k + tok_k, mask=valid[:, None] & mk[None, :], other=0.0).to(tl.float32)
    b_a = 1.0 - tl.load(alpha + p * H + h, mask=valid, other=0.0).to(tl.float32)  # [BT]
    b_e = tl.load(eta + p * H + h, mask=valid, other=1.0).to(tl.float32)
    b_th = tl.load(theta + p * H + h, mask=valid, other=0.0).to(tl.float32)
    return b_q, b_k, b_a, b_e, b_th, valid.to(tl.float32)


@triton.jit
def current_anchor(MT, WT, new_chunk, s_off, s_mask):
    """The anchor of a tile, at ``s_off`` of the running state: the current weights where the tile
    starts a chunk (``new_chunk``), else the running anchor."""
    if new_chunk:
        b_W = tl.load(MT + s_off, mask=s_mask, other=0.0)
    else:
        b_W = tl.load(WT + s_off, mask=s_mask, other=0.0)
    return b_W


@triton.jit
def chunk_momentum_delta_rule_fwd_split_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    M0, S0, W0, offset,  # initial state [N, H, K, V] float32, offset [N]
    cu_seqlens, tile_indptr,  # [N + 1]
    o,  # [B*T, H, V]
    MT, ST, WT,  # [N, H, K, V] float32: the running state (M, S, anchor), then the final state
    tile_M, tile_S,  # [total tiles, H, K, V] float32 (tile-start states)
    norms,  # [B*T, H] float32: each token's ||G_t|| (written when STORE_TILES)
    T, max_norm,  # sequence length; the bound c on each write
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NVS: tl.constexpr, IS_VARLEN: tl.constexpr,
    STORE_TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    """The clipped forward with V in NVS sub-blocks of BV columns (module docstring). Per tile,
    pass 1 sums ``|e_t|^2`` over the sub-blocks (``e = k W_anchor - v``) and clips the steps; pass 2
    writes each sub-block's output and its new ``(M, S)``. At a chunk start the anchor becomes the
    current weights. The same arithmetic as ``chunk_momentum_delta_rule_fwd_kernel`` with
    ``CLIP``, but ``|e_t|^2`` summed over the sub-blocks in turn."""
    i_nh = tl.program_id(1)
    i_n, h = i_nh // H, i_nh % H
    bos, eos, off, j0, n_tiles, first_tile = sequence_bounds(cu_seqlens, tile_indptr, offset, i_n, T, BT, IS_VARLEN)
    R: tl.constexpr = C // BT  # tiles per chunk
    r = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    mk = rk < K
    row = ((i_n * H + h) * K + rk[:, None]).to(tl.int64) * V  # [BK, 1] this head's state rows

    for jv in range(NVS):
        rv = jv * BV + tl.arange(0, BV)
        s_off, s_mask = row + rv[None, :], mk[:, None] & (rv < V)[None, :]
        tl.store(MT + s_off, tl.load(M0 + s_off, mask=s_mask, other=0.0), mask=s_mask)
        tl.store(ST + s_off, tl.load(S0 + s_off, mask=s_mask, other=0.0), mask=s_mask)
        tl.store(WT + s_off, tl.load(W0 + s_off, mask=s_mask, other=0.0), mask=s_mask)
    tl.debug_barrier()
    for i in range(n_tiles):
        j = j0 + i
        new_chunk = (j % R == 0) & (i > 0)  # the anchor becomes the current weights
        p = bos - off + j * BT + r  # [BT] token positions (int64)
        valid = (p >= bos) & (p < eos)
        tok_k = (p[:, None] * H + h) * K + rk[None, :]
        b_q, b_k, b_a, b_e, b_th, m = load_tile_qk_gates(q, k, alpha, eta, theta, tok_k, p, valid, h, H, mk)
        t_row = ((first_tile + i) * H + h) * K * V + rk[:, None] * V  # [BK, 1] in the tile states
        D_a, D_e, A, E, Gam, Bv, g, hh = tile_gates(b_a, b_e, m, r, BT)  # [BT, BT] and [BT]

        # pass 1: |e|^2 over all of V, then the clipped steps
        ee = tl.zeros([BT], dtype=tl.float32)
        for jv in range(NVS):
            rv = jv * BV + tl.arange(0, BV)
            mv = rv < V
            s_mask = mk[:, None] & mv[None, :]
            b_v = tl.load(v + (p[:, None] * H + h) * V + rv[None, :], mask=valid[:, None] & mv[None, :],
                          other=0.0).to(tl.float32)  # [BT, BV]
            b_W = current_anchor(MT, WT, new_chunk, row + rv[None, :], s_mask)  # [BK, BV]
            b_U = mm(b_k, b_W, PRECISION) - b_v  # [BT, BV] errors at the anchor
            ee += tl.sum(b_U * b_U, axis=1)
        b_norm = write_norm(tl.sum(b_k * b_k, axis=1), ee)  # [BT]
        b_th, _ = clip_step(b_th, b_norm, max_norm)
        if STORE_TILES:
            tl.store(norms + p * H + h, b_norm, mask=valid)
        b_P = mm(b_q, tl.trans(b_k), PRECISION) * Gam  # [BT, BT]
        b_kT = tl.trans(b_k)  # [BK, BT]
        A_c, B_c, E_c = take(A, r, BT - 1), take(Bv, r, BT - 1), take(E, r, BT - 1)

        # pass 2: each sub-block's output and state update
        for jv in range(NVS):
            rv = jv * BV + tl.arange(0, BV)
            mv = rv < V
            s_mask = mk[:, None] & mv[None, :]
            tok_v = (p[:, None] * H + h) * V + rv[None, :]
            b_v = tl.load(v + tok_v, mask=valid[:, None] & mv[None, :], other=0.0).to(tl.float32)  # [BT, BV]
            b_M = tl.load(MT + row + rv[None, :], mask=s_mask, other=0.0)  # [BK, BV]
            b_S = tl.load(ST + row + rv[None, :], mask=s_mask, other=0.0)
            b_W = current_anchor(MT, WT, new_chunk, row + rv[None, :], s_mask)
            b_X = b_th[:, None] * (mm(b_k, b_W, PRECISION) - b_v)  # [BT, BV]
            b_o = A[:, None] * mm(b_q, b_M, PRECISION) + Bv[:, None] * mm(b_q, b_S, PRECISION) \
                - mm(b_P, b_X, PRECISION)
            tl.store(o + tok_v, b_o.to(o.dtype.element_ty), mask=valid[:, None] & mv[None, :])
            if STORE_TILES:  # stored here, not beside the loads, where Triton 3.9's layouts send ptxas
                # into its 32-register fallback at K = V = 128 (docs/newest_triton.md)
                tl.store(tile_M + t_row + rv[None, :], b_M, mask=s_mask)
                tl.store(tile_S + t_row + rv[None, :], b_S, mask=s_mask)
            b_M_next = A_c * b_M + B_c * b_S - mm(b_kT, g[:, None] * b_X, PRECISION)
            b_S = E_c * b_S - mm(b_kT, hh[:, None] * b_X, PRECISION)
            tl.debug_barrier()  # every thread has read this sub-block's state before it is overwritten
            tl.store(MT + row + rv[None, :], b_M_next, mask=s_mask)
            tl.store(ST + row + rv[None, :], b_S, mask=s_mask)
            tl.store(WT + row + rv[None, :], b_W, mask=s_mask)
        tl.debug_barrier()  # the next tile reads what this one stored

    # the anchor to hand on: the last chunk's, unless the sequence ends on a chunk boundary
    ends_mid_chunk = (off + eos - bos) % C != 0
    for jv in range(NVS):
        rv = jv * BV + tl.arange(0, BV)
        s_off, s_mask = row + rv[None, :], mk[:, None] & (rv < V)[None, :]
        b_W = tl.where(ends_mid_chunk, tl.load(WT + s_off, mask=s_mask, other=0.0),
                       tl.load(MT + s_off, mask=s_mask, other=0.0))
        tl.debug_barrier()  # every thread has read the sub-block's anchor before it is overwritten
        tl.store(WT + s_off, b_W, mask=s_mask)


@triton.jit
def load_anchor(W0, tile_M, j, R: tl.constexpr, row, w_row, rv, s_mask):
    """Columns rv of the anchor of tile j: the initial anchor in the first chunk, later the
    start state of the chunk's first tile (``row``, ``w_row``: the rows in W0 and in tile_M)."""
    if j < R:
        b_W = tl.load(W0 + row + rv[None, :], mask=s_mask, other=0.0)
    else:
        b_W = tl.load(tile_M + w_row + rv[None, :], mask=s_mask, other=0.0)
    return b_W


@triton.jit
def chunk_momentum_delta_rule_bwd_split_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    W0, offset, cu_seqlens, tile_indptr,  # initial anchor [N, H, K, V]; offset [N]; [N + 1]; [N + 1]
    tile_M, tile_S,  # [total tiles, H, K, V] float32 tile-start states from the forward
    do, dMT, dST, dWT,  # [B*T, H, V]; gradients of the final state [N, H, K, V] float32
    dq, dk,  # [B*T, H, K] float32
    dv,  # [B*T, H, V]
    dalpha, deta, dtheta,  # [B*T, H] float32
    dM0, dS0, dW0,  # [N, H, K, V] float32: the running adjoints of (M, S, anchor), then the result
    norms,  # [B*T, H] float32: the forward's ||G_t|| per token
    T, max_norm,  # sequence length (unpacked input); the bound c on each write
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NVS: tl.constexpr, IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """The clipped backward for heads whose ``[K, V]`` state tile is too large for one block
    (module docstring): one program per (sequence, head) holds all of V, but walks it in NVS
    sub-blocks of BV columns, keeping the adjoints of ``(M, S, anchor)`` in its rows of
    ``dM0, dS0, dW0`` instead of registers. Per tile, pass 1 sums over the sub-blocks what needs
    all of V (``dtheta'``, ``|e|^2``, the gate and q/k adjoints); the clip adjoint ``w`` follows;
    pass 2 recomputes each sub-block's ``dX`` and applies the adjoint of ``U`` (dk, dv, the anchor)
    and the state recursion. Same arithmetic as the single-block kernel, summed in another order."""
    i_nh = tl.program_id(1)
    i_n, h = i_nh // H, i_nh % H
    bos, eos, off, j0, n_tiles, first_tile = sequence_bounds(cu_seqlens, tile_indptr, offset, i_n, T, BT, IS_VARLEN)
    R: tl.constexpr = C // BT
    r = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    mk = rk < K
    row = ((i_n * H + h) * K + rk[:, None]).to(tl.int64) * V  # [BK, 1] this head's state rows
    lower = r[:, None] >= r[None, :]
    last_row = r[:, None] == BT - 1
    is_last = r == BT - 1

    ends_mid_chunk = (off + eos - bos) % C != 0
    for jv in range(NVS):
        rv = jv * BV + tl.arange(0, BV)
        s_off, s_mask = row + rv[None, :], mk[:, None] & (rv < V)[None, :]
        b_dWT = tl.load(dWT + s_off, mask=s_mask, other=0.0)
        tl.store(dM0 + s_off, tl.load(dMT + s_off, mask=s_mask, other=0.0) + tl.where(ends_mid_chunk, 0.0, b_dWT),
                 mask=s_mask)
        tl.store(dS0 + s_off, tl.load(dST + s_off, mask=s_mask, other=0.0), mask=s_mask)
        tl.store(dW0 + s_off, tl.where(ends_mid_chunk, b_dWT, 0.0), mask=s_mask)
    tl.debug_barrier()
    for ii in range(n_tiles):
        i = n_tiles - 1 - ii
        j = j0 + i
        p = bos - off + j * BT + r
        valid = (p >= bos) & (p < eos)
        tok_k = (p[:, None] * H + h) * K + rk[None, :]
        b_q, b_k, b_a, b_e, b_th, m = load_tile_qk_gates(q, k, alpha, eta, theta, tok_k, p, valid, h, H, mk)
        prev_valid = valid & (r > 0) & (p - 1 >= bos)
        a_prev = 1.0 - tl.load(alpha + (p - 1) * H + h, mask=prev_valid, other=0.0).to(tl.float32)
        e_prev = tl.load(eta + (p - 1) * H + h, mask=prev_valid, other=1.0).to(tl.float32)
        t_row = ((first_tile + i) * H + h) * K * V + rk[:, None] * V  # [BK, 1] in the tile states
        w_row = ((first_tile + (j // R) * R - j0) * H + h) * K * V + rk[:, None] * V  # the chunk's first tile

        # recompute the tile's gate coefficients
        D_a, D_e, A, E, Gam, Bv, g, hh = tile_gates(b_a, b_e, m, r, BT)  # [BT, BT] and [BT]
        D_em = D_e * m[:, None]
        Em = E * m
        A_c, B_c, E_c = take(A, r, BT - 1), take(Bv, r, BT - 1), take(E, r, BT - 1)
        b_QK = mm(b_q, tl.trans(b_k), PRECISION)  # [BT, BT]
        b_QKG = b_QK * Gam
        b_norm = tl.load(norms + p * H + h, mask=valid, other=0.0)  # the forward's decisions
        b_th, clipped = clip_step(b_th, b_norm, max_norm)

        # pass 1: everything that sums over V
        dA = tl.zeros([BT], dtype=tl.float32)
        dBv = tl.zeros([BT], dtype=tl.float32)
        dg = tl.zeros([BT], dtype=tl.float32)
        dh = tl.zeros([BT], dtype=tl.float32)
        dth = tl.zeros([BT], dtype=tl.float32)  # adjoint of theta'
        ee = tl.zeros([BT], dtype=tl.float32)  # |e|^2
        dM_M = tl.zeros([BK], dtype=tl.float32)  # row sums of dM * M, dM * S, dS * S
        dM_S = tl.zeros([BK], dtype=tl.float32)
        dS_S = tl.zeros([BK], dtype=tl.float32)
        dP = tl.zeros([BT, BT], dtype=tl.float32)  # do X^T
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        for jv in range(NVS):
            rv = jv * BV + tl.arange(0, BV)
            mv = rv < V
            s_mask = mk[:, None] & mv[None, :]
            tok_v = (p[:, None] * H + h) * V + rv[None, :]
            b_v = tl.load(v + tok_v, mask=valid[:, None] & mv[None, :], other=0.0).to(tl.float32)  # [BT, BV]
            b_do = tl.load(do + tok_v, mask=valid[:, None] & mv[None, :], other=0.0).to(tl.float32)
            b_M = tl.load(tile_M + t_row + rv[None, :], mask=s_mask, other=0.0)  # [BK, BV]
            b_S = tl.load(tile_S + t_row + rv[None, :], mask=s_mask, other=0.0)
            b_W = load_anchor(W0, tile_M, j, R, row, w_row, rv, s_mask)
            b_dM = tl.load(dM0 + row + rv[None, :], mask=s_mask, other=0.0)
            b_dS = tl.load(dS0 + row + rv[None, :], mask=s_mask, other=0.0)
            b_U = mm(b_k, b_W, PRECISION) - b_v
            b_X = b_th[:, None] * b_U
            dA += tl.sum(b_do * mm(b_q, b_M, PRECISION), axis=1)
            dBv += tl.sum(b_do * mm(b_q, b_S, PRECISION), axis=1)
            dM_M += tl.sum(b_dM * b_M, axis=1)
            dM_S += tl.sum(b_dM * b_S, axis=1)
            dS_S += tl.sum(b_dS * b_S, axis=1)
            dP += mm(b_do, tl.trans(b_X), PRECISION)
            b_KdM = mm(b_k, b_dM, PRECISION)
            b_KdS = mm(b_k, b_dS, PRECISION)
            b_dX = -mm(tl.trans(b_QKG), b_do, PRECISION) \
                - g[:, None] * b_KdM - hh[:, None] * b_KdS
            dg -= tl.sum(b_X * b_KdM, axis=1)
            dh -= tl.sum(b_X * b_KdS, axis=1)
            dth += tl.sum(b_dX * b_U, axis=1)
            ee += tl.sum(b_U * b_U, axis=1)
            b_dq += A[:, None] * mm(b_do, tl.trans(b_M), PRECISION) \
                + Bv[:, None] * mm(b_do, tl.trans(b_S), PRECISION)
            b_dk -= mm(g[:, None] * b_X, tl.trans(b_dM), PRECISION) \
                + mm(hh[:, None] * b_X, tl.trans(b_dS), PRECISION)
        dA += tl.where(is_last, tl.sum(dM_M), 0.0)
        dBv += tl.where(is_last, tl.sum(dM_S), 0.0)
        # clipped: theta' = c / n, so dtheta = 0 and dn = -dtheta' theta' / n; w = dn / n
        safe = tl.where(clipped, b_norm, 1.0)
        w = tl.where(clipped, -dth * (b_th / safe) / safe, 0.0)  # [BT]
        kk = tl.sum(b_k * b_k, axis=1)
        dP = tl.where(lower, -dP, 0.0)
        dQK = dP * Gam
        dGam = dP * b_QK + tl.where(last_row, dg[None, :], 0.0)
        b_dq += mm(dQK, b_k, PRECISION)
        b_dk += mm(tl.trans(dQK), b_q, PRECISION)
        b_dk = tl.where(clipped[:, None], b_dk + (w * ee)[:, None] * b_k, b_dk)
        da, de = gate_grads(dGam, dA, dBv, tl.sum(dS_S), dh, D_a, D_e, D_em, Em, m, a_prev, e_prev, r, last_row,
                            is_last)
        tl.store(dq + tok_k, b_dq, mask=valid[:, None] & mk[None, :])
        tl.store(dalpha + p * H + h, -da, mask=valid)
        tl.store(deta + p * H + h, de, mask=valid)
        tl.store(dtheta + p * H + h, tl.where(clipped, 0.0, dth), mask=valid)

        # pass 2: the adjoint of U (theta' dX, plus the norm's share where clipped) into dk, dv and
        # the anchor; the state adjoints step back to the tile start
        chunk_start = (j % R == 0) & (i > 0)
        for jv in range(NVS):
            rv = jv * BV + tl.arange(0, BV)
            mv = rv < V
            s_mask = mk[:, None] & mv[None, :]
            tok_v = (p[:, None] * H + h) * V + rv[None, :]
            b_v = tl.load(v + tok_v, mask=valid[:, None] & mv[None, :], other=0.0).to(tl.float32)
            b_do = tl.load(do + tok_v, mask=valid[:, None] & mv[None, :], other=0.0).to(tl.float32)
            b_W = load_anchor(W0, tile_M, j, R, row, w_row, rv, s_mask)
            b_dM = tl.load(dM0 + row + rv[None, :], mask=s_mask, other=0.0)
            b_dS = tl.load(dS0 + row + rv[None, :], mask=s_mask, other=0.0)
            b_dW = tl.load(dW0 + row + rv[None, :], mask=s_mask, other=0.0)
            b_U = mm(b_k, b_W, PRECISION) - b_v
            b_dX = -mm(tl.trans(b_QKG), b_do, PRECISION) \
                - g[:, None] * mm(b_k, b_dM, PRECISION) \
                - hh[:, None] * mm(b_k, b_dS, PRECISION)
            b_dU = b_th[:, None] * b_dX
            b_dU = tl.where(clipped[:, None], b_dU + (w * kk)[:, None] * b_U, b_dU)
            b_dk += mm(b_dU, tl.trans(b_W), PRECISION)
            b_dW = b_dW + mm(tl.trans(b_k), b_dU, PRECISION)
            tl.store(dv + tok_v, (-b_dU).to(dv.dtype.element_ty), mask=valid[:, None] & mv[None, :])
            # the previous tile ends where this one starts; at a chunk start it is also the anchor
            b_dM_prev = mm(tl.trans(A[:, None] * b_q), b_do, PRECISION) + A_c * b_dM \
                + tl.where(chunk_start, b_dW, 0.0)
            b_dS = mm(tl.trans(Bv[:, None] * b_q), b_do, PRECISION) + B_c * b_dM + E_c * b_dS
            b_dW = tl.where(chunk_start, 0.0, b_dW)
            tl.debug_barrier()  # every thread has read this sub-block's adjoints before they are overwritten
            tl.store(dM0 + row + rv[None, :], b_dM_prev, mask=s_mask)
            tl.store(dS0 + row + rv[None, :], b_dS, mask=s_mask)
            tl.store(dW0 + row + rv[None, :], b_dW, mask=s_mask)
        tl.store(dk + tok_k, b_dk, mask=valid[:, None] & mk[None, :])
        tl.debug_barrier()  # the next tile reads what this one stored
