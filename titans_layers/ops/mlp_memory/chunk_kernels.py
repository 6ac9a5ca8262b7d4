"""Triton chunkwise forward and backward kernels of the MLP-memory update.

Notation (one sequence and head; ``naive.py`` derives the dual form): a tile holds BT tokens
``Q, K`` ``[BT, K]``, ``V`` ``[BT, V]``, gates ``a = 1 - alpha``, ``e = eta``, ``th = theta``; the
chunk's anchor weights are ``(a1, a2)``, the tile-start state is ``(W1, S1, W2, S2)``; ``A, B, E,
Gamma, g, h`` are the linear memory's gate coefficients (segment products, no division)::

    Z = K a1,  Hk = act(Z),  Err = Hk a2 (+ K) - V,  Delta = (Err a2^T) * act'(Z)
    X1 = th * Delta,  X2 = th * Err,  P1 = (Q K^T) * Gamma
    Zq = A * (Q W1) + B * (Q S1) - P1 X1,  Hq = act(Zq)
    O  = A * (Hq W2) + B * (Hq S2) - ((Hq Hk^T) * Gamma) X2 (+ Q)
    W1' = A_c W1 + B_c S1 - K^T (g * X1),   S1' = E_c S1 - K^T (h * X1)
    W2' = A_c W2 + B_c S2 - Hk^T (g * X2),  S2' = E_c S2 - Hk^T (h * X2)

Design.

- Grid: one program per (sequence, head). It walks its sequence tile by tile, BT tokens a
  tile (BT divides C, see Limits; a tile inside a chunk continues mid-chunk with the same
  anchor, as in the linear kernels), padding a sequence that starts mid-chunk or ends mid-tile
  with tokens that write nothing. Hidden units are not independent (``Err`` sums over all of
  them), so the program holds the whole head.
- State in global memory: W1, S1 and the anchor a1 ``[K, Dh]``, W2, S2, a2 ``[Dh, V]`` (float32)
  are far more than a program's registers hold, so they live in float32 buffers
  (the final-state outputs, initialised with the initial state on the host; per head they stay in
  L2) and every pass loops over Dh in blocks of BH columns: ``[BK, BH]`` and ``[BH, BV]`` tiles.
  Everything of size ``[BT, K | V | BT]`` stays in registers for the whole tile.
- Forward, per tile: (0) at the start of a chunk copy the weights into the anchor buffers;
  (1) over Dh blocks accumulate ``Err``; (2) over Dh blocks recompute ``Z``, get ``Delta``,
  ``Zq``, ``Hq``, accumulate ``O`` and ``Hq Hk^T``, and write the block's tile-end state
  (and, when the backward needs it, the block's tile-start state to the per-tile buffers).
- Backward, tiles in reverse, with adjoint buffers of ``(W1, S1, W2, S2)`` and of the current
  chunk's anchor ``(a1, a2)`` (float32, in place: they enter holding the gradients of the final
  state and leave holding those of the initial state): (A) ``Err``; (B) over Dh blocks, every
  reduction over Dh: ``Hq Hk^T``, the adjoints of ``Zq``'s rows through ``P1``, ``dErr``, ``dq``,
  the gate adjoints (so the gate gradients, ``dq``, ``dv`` and ``dtheta`` are final after B),
  handing pass C each block's ``Z``, ``Err a2^T``, ``Hq``, ``dZq`` and ``dX1`` ``[BT, BH]``
  through a float32 workspace of five ``[BT, Dh]`` slots per program (in L2); (C) over Dh
  blocks, read those back (so C recomputes nothing and never loads the tile-start state) and
  write the adjoints of the block's tile-start state and of the anchor; ``dk`` is final after C.
  At the first tile of a chunk the anchor adjoint joins the weights' adjoint (the anchor is the
  chunk-start weights) and is reset.
  Gate gradients: the linear kernel's division-free products, exact at gates 0 and 1.
- Update clipping (``CLIP``, ``ops/common/clipping.py``): token t's step becomes
  ``theta' = theta min(1, c / (theta |G_t|))`` with ``|G_t|^2 = |k|^2 |Delta|^2 + |Hk|^2 |Err|^2``
  at the anchor. The forward gets ``|Hk|^2`` in pass 1 and ``|Delta|^2`` in one more pass over the
  Dh blocks (1b: two ``[BT, BH]`` products a block, as ``Delta`` needs all of ``Err``), then uses
  ``theta'`` everywhere and stores each token's norm ``[B, T, H]`` (float32).
  The backward loads those norms, so its clipping decision is the forward's bit for bit, and
  adds the norm's adjoint: where a step was clipped theta gets no gradient and ``|G|^2`` gets
  ``s = -dtheta' theta' / (2 |G|^2)``, i.e. ``2 s |k|^2 Delta`` more on ``Delta``'s adjoint (pass
  C, and through ``Delta = (Err a2^T) act'(Z)`` a ``[BT, BV]`` sum over Dh gathered in pass B
  onto ``Err``'s), ``2 s |Err|^2 Hk`` on ``Hk``'s (pass C), ``2 s |Hk|^2 Err`` on ``Err``'s and
  ``2 s |Delta|^2 k`` on ``k``'s. Without ``CLIP`` none of it is compiled.
- Barriers. A thread may load an element that another thread stored (the layouts of loads,
  stores and ``tl.dot`` operands differ), so ``tl.debug_barrier()`` (CTA-wide ``bar.sync``, which
  also orders global memory within the block) sits (a) between the last load and the first store
  of a Dh block in every pass that rewrites the block it read (forward pass 2, backward pass C,
  decode pass 2): write-after-read; (b) at the end of every pass that stores state or hands
  values on (forward anchor copy and pass 2, backward pass B before pass C's loads of the
  handoff and its stores, pass C before the next tile's loads and handoff stores):
  read-after-write across blocks and tiles. The interpreter runs each block-wide op at
  once and cannot catch a missing barrier; the placement is by construction.
- Memory the backward keeps per token and head: the inputs, plus one tile-start state
  ``(W1, S1, W2, S2)`` per tile of BT tokens, ``8 Dh (K + V) / BT`` bytes per token. No per-token
  weights. The backward's handoff workspace, ``20 BT Dh`` bytes per (sequence, head), does not
  grow with T.
- Limits: chunk sizes 16, 32, 64 (``tl.dot`` needs every dim >= 16: BT >= 16); K, V <= 128 (one
  register tile each, padded to powers of two >= 16); any Dh (blocks of BH = 32 columns in the
  forward; in the backward 16, or on sm_90 64 for 16-bit inputs at K, V <= 64 and 32 up to 128:
  ``chunk.mlp_launch``). Tiles: BT = min(C, 32), but 16 for float32 inputs with K or V > 64
  (32-bit ``tl.dot`` operands). The shared memory each launch needs is tabled in ``chunk``
  (``TILE_SHARED``, ``FP32_WIDE_SHARED``, ``WIDE_BWD_BLOCKS``) and checked against the compiled
  kernels by ``tests/test_kernel_compile.py``; GPUs with 99 KB a block (sm_86, sm_89, sm_120)
  take 16-token tiles where the 32-token ones do not fit, float32 inputs above K = V = 64 fit
  there only the forward (in 16-column Dh blocks, without gradients), and a backward that does
  not fit raises a ValueError. float32, bfloat16, float16 inputs; accumulation in float32; every
  product goes through ``triton_utils.mm``: IEEE fp32 for float32 inputs, TF32 otherwise, or
  with ``MLPLaunch.lowp_dots`` operands rounded to the bfloat16 / float16 input dtype.
- Parallelism is one program per (sequence, head): the walk over a sequence is serial, so a GPU
  is filled only when N * H is at least its SM count.
- Registers (launch settings: ``chunk.mlp_launch``). Everything of size ``[BT, K | V | BT]`` lives
  for a whole tile and the ``tl.dot`` shapes are small (``[BT, K] x [K, BH]``), so the kernels ask
  for more than a thread's 255 registers and spill, inside the Dh loops; the spills go to L2.
  The pass B to C handoff exists to cut the backward's products and spills; its live registers
  are what to cut next. ``python -m benchmarks.kernel_resources`` counts registers, spills and
  per-token SASS work without a GPU; ``benchmark_mlp_memory --launches`` times launch settings
  on one.
- Numerics of the products (``triton_utils.mm``; the interpreter emulates the GPU's operand
  rounding, so the CPU tests see it). A state that decays to nearly zero loses relative
  precision under TF32 and bf16 operands; float16 operands flush it to zero.

Resource and error figures (shared memory, registers, spills, per-token counts, what was tried
without gain, relative errors): docs/kernels.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from titans_layers.ops.common.triton_utils import clip_step, gate_grads, mm, take, tile_gates
from titans_layers.ops.momentum_delta_rule.chunk_kernels import load_tile, sequence_bounds


@triton.jit
def activation(z, ACT: tl.constexpr):
    """``(act(z), act'(z), act''(z))`` for SiLU (ACT = 0) or exact GELU (ACT = 1)."""
    if ACT == 0:
        s = tl.sigmoid(z)
        y = z * s
        d1 = s * (1.0 + z * (1.0 - s))
        d2 = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        y = z * cdf
        d1 = cdf + z * pdf
        d2 = pdf * (2.0 - z * z)
    return y, d1, d2


@triton.jit
def block_offsets(jb, rk, rv, rb, mk, mv, K: tl.constexpr, V: tl.constexpr, Dh: tl.constexpr,
                  BH: tl.constexpr):
    """Offsets and masks of Dh block ``jb`` inside one head's ``[K, Dh]`` and ``[Dh, V]``."""
    rh = jb * BH + rb  # [BH]
    mh = rh < Dh
    off1 = rk[:, None] * Dh + rh[None, :]  # [BK, BH]
    off2 = rh[:, None] * V + rv[None, :]  # [BH, BV]
    return off1, mk[:, None] & mh[None, :], off2, mh[:, None] & mv[None, :]


@triton.jit
def handoff_offsets(jb, r, rb, Dh: tl.constexpr, BH: tl.constexpr):
    """Offsets ``[BT, BH]`` and column mask ``[1, BH]`` of Dh block ``jb`` in a ``[BT, Dh]`` slot."""
    rh = jb * BH + rb  # [BH]
    return r[:, None] * Dh + rh[None, :], (rh < Dh)[None, :]


@triton.jit
def anchor_error(b_k, b_v, a1, a2, rk, rv, rb, mk, mv,
                 K: tl.constexpr, V: tl.constexpr, Dh: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                 BH: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, CLIP: tl.constexpr,
                 PRECISION: tl.constexpr):
    """``Err = act(K a1) a2 (+ K) - V`` ``[BT, BV]`` at the anchor (``a1``, ``a2``: one head's
    anchor buffers), summed over the Dh blocks, and with ``CLIP`` each row's ``|Hk|^2`` ``[BT]``
    (zeros without)."""
    b_err = tl.zeros([BT, BV], dtype=tl.float32)
    b_nh = tl.zeros([BT], dtype=tl.float32)
    for jb in range(0, (Dh + BH - 1) // BH):
        off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)
        b_a1 = tl.load(a1 + off1, mask=m1, other=0.0)  # [BK, BH]
        b_a2 = tl.load(a2 + off2, mask=m2, other=0.0)  # [BH, BV]
        b_hk, _, _ = activation(mm(b_k, b_a1, PRECISION), ACT)  # [BT, BH]
        b_err += mm(b_hk, b_a2, PRECISION)
        if CLIP:
            b_nh += tl.sum(b_hk * b_hk, axis=1)
    if RESIDUAL:
        b_err += b_k  # K == V, so BK == BV
    return b_err - b_v, b_nh


@triton.jit
def write_norm(b_k, b_err, b_nh, a1, a2, rk, rv, rb, mk, mv,
               K: tl.constexpr, V: tl.constexpr, Dh: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
               ACT: tl.constexpr, PRECISION: tl.constexpr):
    """Each row's write norm ``|G_t| = sqrt(|k|^2 |Delta|^2 + |Hk|^2 |Err|^2)`` ``[BT]`` at the
    anchor (``clipping.py``), given ``Err`` and ``|Hk|^2``: one more pass over the Dh blocks for
    ``|Delta|^2``, ``Delta = (Err a2^T) * act'(K a1)``."""
    b_nd = tl.zeros([BT], dtype=tl.float32)
    for jb in range(0, (Dh + BH - 1) // BH):
        off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)
        b_a1 = tl.load(a1 + off1, mask=m1, other=0.0)  # [BK, BH]
        b_a2 = tl.load(a2 + off2, mask=m2, other=0.0)  # [BH, BV]
        _, b_d1, _ = activation(mm(b_k, b_a1, PRECISION), ACT)
        b_delta = mm(b_err, tl.trans(b_a2), PRECISION) * b_d1  # [BT, BH]
        b_nd += tl.sum(b_delta * b_delta, axis=1)
    return tl.sqrt(tl.sum(b_k * b_k, axis=1) * b_nd + b_nh * tl.sum(b_err * b_err, axis=1))


@triton.jit
def recompute_block(b_q, b_k, b_err, b_P1, A, Bv, b_th, b_a1, b_a2, b_W1, b_S1,
                    ACT: tl.constexpr, PRECISION: tl.constexpr):
    """One Dh block of a tile: Hk, act'(Z), act''(Z), Err a2^T, Delta, X1, Q W1, Q S1, Hq,
    act'(Zq), Z, all ``[BT, BH]``."""
    b_z = mm(b_k, b_a1, PRECISION)
    b_hk, b_d1, b_d2 = activation(b_z, ACT)
    b_ea = mm(b_err, tl.trans(b_a2), PRECISION)  # [BT, BH]
    b_delta = b_ea * b_d1
    b_x1 = b_th[:, None] * b_delta
    b_qw1 = mm(b_q, b_W1, PRECISION)
    b_qs1 = mm(b_q, b_S1, PRECISION)
    b_zq = A[:, None] * b_qw1 + Bv[:, None] * b_qs1 - mm(b_P1, b_x1, PRECISION)
    b_hq, b_dq1, _ = activation(b_zq, ACT)
    return b_hk, b_d1, b_d2, b_ea, b_delta, b_x1, b_qw1, b_qs1, b_hq, b_dq1, b_z


@triton.jit
def chunk_mlp_memory_fwd_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    offset, cu_seqlens, tile_indptr,  # [N], [N + 1], [N + 1]
    o,  # [B*T, H, V]
    W1, S1, A1,  # [N, H, K, Dh] float32, in place: initial state in, final state out (A1: current anchor)
    W2, S2, A2,  # [N, H, Dh, V] float32, likewise
    tile_W1, tile_S1, tile_W2, tile_S2,  # [n_tiles, H, K, Dh] / [n_tiles, H, Dh, V] float32 tile-start states
    norms,  # [B*T, H] float32: each token's write norm (written with CLIP)
    T, max_norm,  # max_norm: the clipping bound c (used with CLIP)
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, Dh: tl.constexpr, C: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr,
    RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_TILES: tl.constexpr, CLIP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n, h = i_nh // H, i_nh % H
    bos, eos, off, j0, n_tiles, first_tile = sequence_bounds(cu_seqlens, tile_indptr, offset, i_n, T, BT, IS_VARLEN)
    R: tl.constexpr = C // BT  # tiles per chunk
    NH: tl.constexpr = (Dh + BH - 1) // BH  # Dh blocks
    r = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    rb = tl.arange(0, BH)
    mk, mv = rk < K, rv < V
    base1 = i_nh.to(tl.int64) * K * Dh  # this head's [K, Dh] in the state buffers
    base2 = i_nh.to(tl.int64) * Dh * V  # this head's [Dh, V]

    for i in range(n_tiles):
        j = j0 + i
        p = bos - off + j * BT + r  # [BT] token positions (int64)
        valid = (p >= bos) & (p < eos)
        b_q, b_k, b_v, b_a, b_e, b_th = load_tile(q, k, v, alpha, eta, theta, p, valid, h, H, K, V, rk, rv, mk, mv)
        m = valid.to(tl.float32)
        D_a, D_e, A, E, Gam, Bv, g, hh = tile_gates(b_a, b_e, m, r, BT)
        A_c, B_c, E_c = take(A, r, BT - 1), take(Bv, r, BT - 1), take(E, r, BT - 1)
        tb1 = ((first_tile + i) * H + h) * K * Dh  # this tile's slot in the per-tile buffers
        tb2 = ((first_tile + i) * H + h) * Dh * V

        # (0) a new chunk takes its gradients at the current weights
        if (j % R == 0) & (i > 0):
            for jb in range(0, NH):
                off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)
                tl.store(A1 + base1 + off1, tl.load(W1 + base1 + off1, mask=m1, other=0.0), mask=m1)
                tl.store(A2 + base2 + off2, tl.load(W2 + base2 + off2, mask=m2, other=0.0), mask=m2)
            tl.debug_barrier()  # the copies are read by other threads in passes 1 and 2

        # (1) the error at the anchor, summed over Dh
        b_err, b_nh = anchor_error(b_k, b_v, A1 + base1, A2 + base2, rk, rv, rb, mk, mv,
                                   K, V, Dh, BT, BV, BH, ACT, RESIDUAL, CLIP, PRECISION)  # [BT, BV], [BT]
        if CLIP:  # (1b) the write norms; every later use of theta takes the clipped step
            b_norm = write_norm(b_k, b_err, b_nh, A1 + base1, A2 + base2, rk, rv, rb, mk, mv,
                                K, V, Dh, BT, BH, ACT, PRECISION)  # [BT]
            tl.store(norms + p * H + h, b_norm, mask=valid)
            b_th, clipped = clip_step(b_th, b_norm, max_norm)
        b_x2 = b_th[:, None] * b_err

        # (2) read and write, Dh block by block
        b_P1 = mm(b_q, tl.trans(b_k), PRECISION) * Gam  # [BT, BT]
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        b_Pk = tl.zeros([BT, BT], dtype=tl.float32)  # Hq Hk^T
        for jb in range(0, NH):
            off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)
            b_a1 = tl.load(A1 + base1 + off1, mask=m1, other=0.0)  # [BK, BH]
            b_a2 = tl.load(A2 + base2 + off2, mask=m2, other=0.0)  # [BH, BV]
            b_W1 = tl.load(W1 + base1 + off1, mask=m1, other=0.0)  # [BK, BH]
            b_S1 = tl.load(S1 + base1 + off1, mask=m1, other=0.0)
            b_W2 = tl.load(W2 + base2 + off2, mask=m2, other=0.0)  # [BH, BV]
            b_S2 = tl.load(S2 + base2 + off2, mask=m2, other=0.0)
            if STORE_TILES:
                tl.store(tile_W1 + tb1 + off1, b_W1, mask=m1)
                tl.store(tile_S1 + tb1 + off1, b_S1, mask=m1)
                tl.store(tile_W2 + tb2 + off2, b_W2, mask=m2)
                tl.store(tile_S2 + tb2 + off2, b_S2, mask=m2)
            b_hk, _, _, _, _, b_x1, _, _, b_hq, _, _ = recompute_block(
                b_q, b_k, b_err, b_P1, A, Bv, b_th, b_a1, b_a2, b_W1, b_S1, ACT, PRECISION)
            b_o += A[:, None] * mm(b_hq, b_W2, PRECISION) \
                + Bv[:, None] * mm(b_hq, b_S2, PRECISION)
            b_Pk += mm(b_hq, tl.trans(b_hk), PRECISION)
            b_kT, b_hkT = tl.trans(b_k), tl.trans(b_hk)  # [BK, BT], [BH, BT]
            b_W1n = A_c * b_W1 + B_c * b_S1 - mm(b_kT, g[:, None] * b_x1, PRECISION)
            b_S1n = E_c * b_S1 - mm(b_kT, hh[:, None] * b_x1, PRECISION)
            b_W2n = A_c * b_W2 + B_c * b_S2 - mm(b_hkT, g[:, None] * b_x2, PRECISION)
            b_S2n = E_c * b_S2 - mm(b_hkT, hh[:, None] * b_x2, PRECISION)
            tl.debug_barrier()  # every thread has read this block before any rewrites it
            tl.store(W1 + base1 + off1, b_W1n, mask=m1)
            tl.store(S1 + base1 + off1, b_S1n, mask=m1)
            tl.store(W2 + base2 + off2, b_W2n, mask=m2)
            tl.store(S2 + base2 + off2, b_S2n, mask=m2)
        tl.debug_barrier()  # the new state is read by other threads in the next tile
        b_o -= mm(b_Pk * Gam, b_x2, PRECISION)
        if RESIDUAL:
            b_o += b_q
        tl.store(o + (p[:, None] * H + h) * V + rv[None, :], b_o.to(o.dtype.element_ty),
                 mask=valid[:, None] & mv[None, :])


@triton.jit
def chunk_mlp_memory_bwd_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    offset, cu_seqlens, tile_indptr,  # [N], [N + 1], [N + 1]
    A1_0, A2_0,  # initial anchors [N, H, K, Dh], [N, H, Dh, V] float32
    tile_W1, tile_S1, tile_W2, tile_S2,  # tile-start states from the forward
    do,  # [B*T, H, V]
    dW1, dS1, dA1,  # [N, H, K, Dh] float32, in place: gradients of the final state in, of the initial out
    dW2, dS2, dA2,  # [N, H, Dh, V] float32, likewise (dA: adjoint of the current chunk's anchor)
    dq, dk, dv,  # [B*T, H, K|V] in the input dtype
    dalpha, deta, dtheta,  # [B*T, H] in the gates' dtypes
    norms,  # [B*T, H] float32: the forward's write norms (read with CLIP)
    handoff,  # [N * H, 5, BT, Dh] float32 workspace: pass B's Z, Err a2^T, Hq, dZq, dX1 for pass C
    T, max_norm,  # max_norm: the clipping bound c (used with CLIP)
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, Dh: tl.constexpr, C: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr,
    RESIDUAL: tl.constexpr, IS_VARLEN: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n, h = i_nh // H, i_nh % H
    bos, eos, off, j0, n_tiles, first_tile = sequence_bounds(cu_seqlens, tile_indptr, offset, i_n, T, BT, IS_VARLEN)
    R: tl.constexpr = C // BT
    NH: tl.constexpr = (Dh + BH - 1) // BH
    r = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    rb = tl.arange(0, BH)
    mk, mv = rk < K, rv < V
    base1 = i_nh.to(tl.int64) * K * Dh
    base2 = i_nh.to(tl.int64) * Dh * V
    SLOT: tl.constexpr = BT * Dh
    scr = handoff + i_nh.to(tl.int64) * 5 * SLOT  # this program's [5, BT, Dh]
    lower = r[:, None] >= r[None, :]
    last_row = r[:, None] == BT - 1
    is_last = r == BT - 1

    for ii in range(n_tiles):
        i = n_tiles - 1 - ii
        j = j0 + i
        p = bos - off + j * BT + r
        valid = (p >= bos) & (p < eos)
        b_q, b_k, b_v, b_a, b_e, b_th = load_tile(q, k, v, alpha, eta, theta, p, valid, h, H, K, V, rk, rv, mk, mv)
        if CLIP:  # the forward's norms, so the clipping decision is the forward's, bit for bit
            b_norm = tl.load(norms + p * H + h, mask=valid, other=0.0)  # [BT]
            b_th, clipped = clip_step(b_th, b_norm, max_norm)
        m = valid.to(tl.float32)
        prev_valid = valid & (r > 0) & (p - 1 >= bos)
        a_prev = 1.0 - tl.load(alpha + (p - 1) * H + h, mask=prev_valid, other=0.0).to(tl.float32)  # [BT]
        e_prev = tl.load(eta + (p - 1) * H + h, mask=prev_valid, other=1.0).to(tl.float32)
        D_a, D_e, A, E, Gam, Bv, g, hh = tile_gates(b_a, b_e, m, r, BT)
        D_em = D_e * m[:, None]
        Em = E * m
        A_c, B_c, E_c = take(A, r, BT - 1), take(Bv, r, BT - 1), take(E, r, BT - 1)
        tb1 = ((first_tile + i) * H + h) * K * Dh
        tb2 = ((first_tile + i) * H + h) * Dh * V
        if j < R:  # the first chunk keeps the initial anchor
            a1 = A1_0 + base1
            a2 = A2_0 + base2
        else:  # later chunks anchor at the start state of their first tile
            w_tile = (first_tile + (j // R) * R - j0) * H + h
            a1 = tile_W1 + w_tile * K * Dh
            a2 = tile_W2 + w_tile * Dh * V
        b_do = tl.load(do + (p[:, None] * H + h) * V + rv[None, :], mask=valid[:, None] & mv[None, :],
                       other=0.0).to(tl.float32)  # [BT, BV]
        b_QK = mm(b_q, tl.trans(b_k), PRECISION)  # [BT, BT]
        b_P1 = b_QK * Gam

        # (A) the error at the anchor
        b_err, b_nh = anchor_error(b_k, b_v, a1, a2, rk, rv, rb, mk, mv,
                                   K, V, Dh, BT, BV, BH, ACT, RESIDUAL, CLIP, PRECISION)  # [BT, BV], [BT]
        b_x2 = b_th[:, None] * b_err
        dP2 = tl.where(lower, -mm(b_do, tl.trans(b_x2), PRECISION), 0.0)  # [BT, BT]
        dPk = dP2 * Gam  # adjoint of Hq Hk^T

        # (B) reductions over Dh
        b_Pk = tl.zeros([BT, BT], dtype=tl.float32)
        dP1 = tl.zeros([BT, BT], dtype=tl.float32)
        b_U2 = tl.zeros([BT, BV], dtype=tl.float32)  # Hk dW2'
        b_U2s = tl.zeros([BT, BV], dtype=tl.float32)  # Hk dS2'
        b_derr = tl.zeros([BT, BV], dtype=tl.float32)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        dA = tl.zeros([BT], dtype=tl.float32)
        dBv = tl.zeros([BT], dtype=tl.float32)
        dg = tl.zeros([BT], dtype=tl.float32)
        dh = tl.zeros([BT], dtype=tl.float32)
        dth = tl.zeros([BT], dtype=tl.float32)
        b_nd = tl.zeros([BT], dtype=tl.float32)  # |Delta|^2 (CLIP)
        b_R = tl.zeros([BT, BV], dtype=tl.float32)  # (Delta * act'(Z)) a2, summed over Dh (CLIP)
        sA = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)  # <dW', W>, <dW', S>, <dS', S> over both layers
        sB = sA
        sE = sA
        for jb in range(0, NH):
            off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)
            b_a1 = tl.load(a1 + off1, mask=m1, other=0.0)  # [BK, BH]
            b_a2 = tl.load(a2 + off2, mask=m2, other=0.0)  # [BH, BV]
            b_W1 = tl.load(tile_W1 + tb1 + off1, mask=m1, other=0.0)  # [BK, BH] tile-start state
            b_S1 = tl.load(tile_S1 + tb1 + off1, mask=m1, other=0.0)
            b_W2 = tl.load(tile_W2 + tb2 + off2, mask=m2, other=0.0)  # [BH, BV]
            b_S2 = tl.load(tile_S2 + tb2 + off2, mask=m2, other=0.0)
            b_dW1 = tl.load(dW1 + base1 + off1, mask=m1, other=0.0)  # [BK, BH] adjoints of the tile-end state
            b_dS1 = tl.load(dS1 + base1 + off1, mask=m1, other=0.0)
            b_dW2 = tl.load(dW2 + base2 + off2, mask=m2, other=0.0)  # [BH, BV]
            b_dS2 = tl.load(dS2 + base2 + off2, mask=m2, other=0.0)
            b_hk, b_d1, _, b_ea, b_delta, b_x1, b_qw1, b_qs1, b_hq, b_dq1, b_z = recompute_block(
                b_q, b_k, b_err, b_P1, A, Bv, b_th, b_a1, b_a2, b_W1, b_S1, ACT, PRECISION)
            b_Pk += mm(b_hq, tl.trans(b_hk), PRECISION)
            dA += tl.sum(b_do * mm(b_hq, b_W2, PRECISION), axis=1)
            dBv += tl.sum(b_do * mm(b_hq, b_S2, PRECISION), axis=1)
            b_dhq = A[:, None] * mm(b_do, tl.trans(b_W2), PRECISION) \
                + Bv[:, None] * mm(b_do, tl.trans(b_S2), PRECISION) \
                + mm(dPk, b_hk, PRECISION)  # [BT, BH]
            b_dzq = b_dhq * b_dq1
            dP1 -= mm(b_dzq, tl.trans(b_x1), PRECISION)
            dA += tl.sum(b_dzq * b_qw1, axis=1)
            dBv += tl.sum(b_dzq * b_qs1, axis=1)
            b_dq += A[:, None] * mm(b_dzq, tl.trans(b_W1), PRECISION) \
                + Bv[:, None] * mm(b_dzq, tl.trans(b_S1), PRECISION)
            b_kdw1 = mm(b_k, b_dW1, PRECISION)  # [BT, BH]
            b_kds1 = mm(b_k, b_dS1, PRECISION)
            b_dx1 = -mm(tl.trans(b_P1), b_dzq, PRECISION) \
                - g[:, None] * b_kdw1 - hh[:, None] * b_kds1
            dg -= tl.sum(b_x1 * b_kdw1, axis=1)
            dh -= tl.sum(b_x1 * b_kds1, axis=1)
            dth += tl.sum(b_dx1 * b_delta, axis=1)
            # what pass C needs of this block, so that it recomputes none of it
            off_s, m_s = handoff_offsets(jb, r, rb, Dh, BH)
            tl.store(scr + off_s, b_z, mask=m_s)
            tl.store(scr + SLOT + off_s, b_ea, mask=m_s)
            tl.store(scr + 2 * SLOT + off_s, b_hq, mask=m_s)
            tl.store(scr + 3 * SLOT + off_s, b_dzq, mask=m_s)
            tl.store(scr + 4 * SLOT + off_s, b_dx1, mask=m_s)
            b_rr = b_th[:, None] * b_dx1 * b_d1  # adjoint of Err a2^T
            b_derr += mm(b_rr, b_a2, PRECISION)
            b_U2 += mm(b_hk, b_dW2, PRECISION)
            b_U2s += mm(b_hk, b_dS2, PRECISION)
            b_dk -= mm(g[:, None] * b_x1, tl.trans(b_dW1), PRECISION) \
                + mm(hh[:, None] * b_x1, tl.trans(b_dS1), PRECISION)
            sA += tl.sum(b_dW1 * b_W1) + tl.sum(b_dW2 * b_W2)
            sB += tl.sum(b_dW1 * b_S1) + tl.sum(b_dW2 * b_S2)
            sE += tl.sum(b_dS1 * b_S1) + tl.sum(b_dS2 * b_S2)
            if CLIP:
                b_nd += tl.sum(b_delta * b_delta, axis=1)
                b_R += mm(b_delta * b_d1, b_a2, PRECISION)
        tl.debug_barrier()  # pass C reads the handoff and rewrites the adjoint blocks that pass B read

        dP1 = tl.where(lower, dP1, 0.0)
        b_dx2 = -mm(tl.trans(b_Pk * Gam), b_do, PRECISION) - g[:, None] * b_U2 \
            - hh[:, None] * b_U2s  # [BT, BV]
        dg -= tl.sum(b_x2 * b_U2, axis=1)
        dh -= tl.sum(b_x2 * b_U2s, axis=1)
        dth += tl.sum(b_dx2 * b_err, axis=1)
        b_derr += b_th[:, None] * b_dx2
        if CLIP:
            # dth holds the adjoint of the clipped step. Where it clipped, theta' = c / |G| takes no
            # gradient from theta and |G|^2 = |k|^2 |Delta|^2 + |Hk|^2 |Err|^2 gets s = -dth theta' / (2 |G|^2)
            s = tl.where(clipped, -dth * b_th / (2.0 * tl.where(clipped, b_norm * b_norm, 1.0)), 0.0)  # [BT]
            dth = tl.where(clipped, 0.0, dth)
            sk = 2.0 * s * tl.sum(b_k * b_k, axis=1)  # Delta's extra adjoint is sk * Delta
            se = 2.0 * s * tl.sum(b_err * b_err, axis=1)  # Hk's is se * Hk
            b_derr += sk[:, None] * b_R + (2.0 * s * b_nh)[:, None] * b_err
            b_dk += (2.0 * s * b_nd)[:, None] * b_k
        dQK = dP1 * Gam
        b_dq += mm(dQK, b_k, PRECISION)
        b_dk += mm(tl.trans(dQK), b_q, PRECISION)
        if RESIDUAL:
            b_dq += b_do
            b_dk += b_derr

        # gates: Gamma = D_a (m D_e), B = D_a (m E), A = cumprod(a), E = cumprod(e) (as the linear kernel)
        dGam = dP2 * b_Pk + dP1 * b_QK + tl.where(last_row, dg[None, :], 0.0)
        dA += tl.where(is_last, sA, 0.0)
        dBv += tl.where(is_last, sB, 0.0)
        da, de = gate_grads(dGam, dA, dBv, sE, dh, D_a, D_e, D_em, Em, m, a_prev, e_prev, r, last_row, is_last)

        tok_k = (p[:, None] * H + h) * K + rk[None, :]
        tl.store(dq + tok_k, b_dq.to(dq.dtype.element_ty), mask=valid[:, None] & mk[None, :])
        tl.store(dv + (p[:, None] * H + h) * V + rv[None, :], (-b_derr).to(dv.dtype.element_ty),
                 mask=valid[:, None] & mv[None, :])
        tl.store(dalpha + p * H + h, (-da).to(dalpha.dtype.element_ty), mask=valid)
        tl.store(deta + p * H + h, de.to(deta.dtype.element_ty), mask=valid)
        tl.store(dtheta + p * H + h, dth.to(dtheta.dtype.element_ty), mask=valid)

        # (C) per Dh block: adjoints of Z, the anchor and the tile-start state
        chunk_start = (j % R == 0) & (i > 0)  # this tile's start state is its chunk's anchor
        for jb in range(0, NH):
            off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)
            off_s, m_s = handoff_offsets(jb, r, rb, Dh, BH)
            b_a1 = tl.load(a1 + off1, mask=m1, other=0.0)
            b_a2 = tl.load(a2 + off2, mask=m2, other=0.0)
            b_dW1 = tl.load(dW1 + base1 + off1, mask=m1, other=0.0)
            b_dS1 = tl.load(dS1 + base1 + off1, mask=m1, other=0.0)
            b_dA1 = tl.load(dA1 + base1 + off1, mask=m1, other=0.0)
            b_dW2 = tl.load(dW2 + base2 + off2, mask=m2, other=0.0)
            b_dS2 = tl.load(dS2 + base2 + off2, mask=m2, other=0.0)
            b_dA2 = tl.load(dA2 + base2 + off2, mask=m2, other=0.0)
            b_hk, b_d1, b_d2 = activation(tl.load(scr + off_s, mask=m_s, other=0.0), ACT)  # [BT, BH]
            b_ea = tl.load(scr + SLOT + off_s, mask=m_s, other=0.0)  # Err a2^T
            b_hq = tl.load(scr + 2 * SLOT + off_s, mask=m_s, other=0.0)
            b_dzq = tl.load(scr + 3 * SLOT + off_s, mask=m_s, other=0.0)
            b_ddelta = b_th[:, None] * tl.load(scr + 4 * SLOT + off_s, mask=m_s, other=0.0)  # th * dX1
            if CLIP:
                b_ddelta += sk[:, None] * (b_ea * b_d1)
            b_rr = b_ddelta * b_d1
            b_dhk = mm(tl.trans(dPk), b_hq, PRECISION) \
                - mm(g[:, None] * b_x2, tl.trans(b_dW2), PRECISION) \
                - mm(hh[:, None] * b_x2, tl.trans(b_dS2), PRECISION) \
                + mm(b_derr, tl.trans(b_a2), PRECISION)  # [BT, BH]
            if CLIP:
                b_dhk += se[:, None] * b_hk
            b_dz = b_ddelta * b_ea * b_d2 + b_dhk * b_d1  # [BT, BH]
            b_dA1 += mm(tl.trans(b_k), b_dz, PRECISION)
            b_dA2 += mm(tl.trans(b_rr), b_err, PRECISION) \
                + mm(tl.trans(b_hk), b_derr, PRECISION)
            b_dk += mm(b_dz, tl.trans(b_a1), PRECISION)
            b_dW1n = mm(tl.trans(A[:, None] * b_q), b_dzq, PRECISION) + A_c * b_dW1
            b_dS1n = mm(tl.trans(Bv[:, None] * b_q), b_dzq, PRECISION) + B_c * b_dW1 \
                + E_c * b_dS1
            b_dW2n = mm(tl.trans(A[:, None] * b_hq), b_do, PRECISION) + A_c * b_dW2
            b_dS2n = mm(tl.trans(Bv[:, None] * b_hq), b_do, PRECISION) + B_c * b_dW2 \
                + E_c * b_dS2
            # the anchor is the chunk-start weights: at the chunk's first tile its adjoint joins theirs
            b_dW1n += tl.where(chunk_start, b_dA1, 0.0)
            b_dW2n += tl.where(chunk_start, b_dA2, 0.0)
            b_dA1 = tl.where(chunk_start, 0.0, b_dA1)
            b_dA2 = tl.where(chunk_start, 0.0, b_dA2)
            tl.debug_barrier()  # every thread has read this block before any rewrites it
            tl.store(dW1 + base1 + off1, b_dW1n, mask=m1)
            tl.store(dS1 + base1 + off1, b_dS1n, mask=m1)
            tl.store(dA1 + base1 + off1, b_dA1, mask=m1)
            tl.store(dW2 + base2 + off2, b_dW2n, mask=m2)
            tl.store(dS2 + base2 + off2, b_dS2n, mask=m2)
            tl.store(dA2 + base2 + off2, b_dA2, mask=m2)
        tl.debug_barrier()  # the previous tile reads these adjoints from other threads
        tl.store(dk + tok_k, b_dk.to(dk.dtype.element_ty), mask=valid[:, None] & mk[None, :])
