"""``fused_recurrent_mlp_memory``: the Triton token-by-token kernel of the MLP memory, for decoding.

One program per (sequence, head) applies the update one token at a time. As in the chunk
kernels the state (W1, S1, anchor1 ``[K, Dh]``; W2, S2, anchor2 ``[Dh, V]``, float32) lives in
global buffers (the final-state outputs, initialised on the host) and is walked in blocks of BH
hidden units. Per token: (0) on a chunk boundary copy the weights into the anchor buffers;
(1) over Dh blocks, ``err = act(k a1) a2 (+ k) - v`` ``[V]``; (2) over Dh blocks, ``delta =
(a2 err) * act'(k a1)``, the block's new ``S1, W1, S2, W2``, and the read after the write
``o += act(q W1_new) W2_new`` (a block of ``q W1`` needs only that block of W1). With update
clipping (``CLIP``) pass 1 also sums ``|act(k a1)|^2`` and a pass 1b over the Dh blocks sums
``|delta|^2`` for the write norm, and pass 2 takes the clipped step. Vectors are
``[BK]``, ``[BV]``, ``[BH]``, so no ``tl.dot`` and no minimum tile size.

Barriers (``tl.debug_barrier()``, as in ``chunk_kernels.py``): after the anchor copy (pass 1
reads it from other threads); in pass 2 between a block's loads and its stores (write after
read); at the end of pass 2 (the next token reads the new state from other threads).

It reproduces the chunked forward at any split point (the state carries the partial chunk's
anchor and offset), so a prefill with ``chunk_mlp_memory`` followed by decoding with this op
equals one long call. Gradients: the chunkwise backward (``chunk.py``) for chunk sizes 16, 32,
64 (the tile-start states are recomputed by the chunk forward); for other chunk sizes autograd
through ``naive_chunk_mlp_memory``. K, V <= 128; any Dh; any chunk size >= 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titans_layers.ops.common.clipping import check_max_update_norm
from titans_layers.ops.common.traceable import traceable
from titans_layers.ops.common.triton_utils import clip_step, explained_launch, gpu_of, sequence_range
from titans_layers.ops.mlp_memory.chunk import (KERNEL_CHUNK_SIZES, ChunkPlan, chunk_bwd, chunk_fwd, mlp_launch,
                                                pack_final_state, prepare_kernel_call)
from titans_layers.ops.momentum_delta_rule.chunk import varlen_args
from titans_layers.ops.mlp_memory.chunk_kernels import activation, block_offsets
from titans_layers.ops.mlp_memory.naive import ACTIVATIONS, naive_chunk_mlp_memory
from titans_layers.ops.mlp_memory.state import MLPMemoryState
from titans_layers.ops.momentum_delta_rule.chunk_kernels import load_token


@triton.jit
def fused_recurrent_mlp_memory_fwd_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    offset, cu_seqlens,  # [N], [N + 1]
    o,  # [B*T, H, V]
    W1, S1, A1,  # [N, H, K, Dh] float32, in place: initial state in, final state out
    W2, S2, A2,  # [N, H, Dh, V] float32, likewise
    T, max_norm,  # max_norm: the clipping bound c (used with CLIP)
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, Dh: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr,
    IS_VARLEN: tl.constexpr, CLIP: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n, h = i_nh // H, i_nh % H
    bos, eos = sequence_range(cu_seqlens, i_n, T, IS_VARLEN)
    off = tl.load(offset + i_n).to(tl.int64)
    NH: tl.constexpr = (Dh + BH - 1) // BH
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    rb = tl.arange(0, BH)
    mk, mv = rk < K, rv < V
    base1 = i_nh.to(tl.int64) * K * Dh
    base2 = i_nh.to(tl.int64) * Dh * V
    for t in range(bos, eos):
        # (0) a new chunk takes its gradients at the current weights
        if off == 0:
            for jb in range(0, NH):
                off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)  # [BK, BH], [BH, BV]
                tl.store(A1 + base1 + off1, tl.load(W1 + base1 + off1, mask=m1, other=0.0), mask=m1)
                tl.store(A2 + base2 + off2, tl.load(W2 + base2 + off2, mask=m2, other=0.0), mask=m2)
            tl.debug_barrier()  # pass 1 reads the copies from other threads
        b_q, b_k, b_v, b_a, b_e, b_th = load_token(q, k, v, alpha, eta, theta, t, h, H, K, V, rk, rv, mk, mv)

        # (1) the error at the anchor (and |act(k a1)|^2 for the write norm)
        b_err = tl.zeros([BV], dtype=tl.float32)
        b_nh = tl.sum(tl.zeros([BH], dtype=tl.float32), axis=0)
        for jb in range(0, NH):
            off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)  # [BK, BH], [BH, BV]
            b_a1 = tl.load(A1 + base1 + off1, mask=m1, other=0.0)  # [BK, BH]
            b_a2 = tl.load(A2 + base2 + off2, mask=m2, other=0.0)  # [BH, BV]
            b_hk, _, _ = activation(tl.sum(b_k[:, None] * b_a1, axis=0), ACT)  # [BH]
            b_err += tl.sum(b_hk[:, None] * b_a2, axis=0)
            if CLIP:
                b_nh += tl.sum(b_hk * b_hk)
        if RESIDUAL:
            b_err += b_k  # K == V, so BK == BV
        b_err -= b_v
        if CLIP:  # (1b) |delta|^2 over Dh blocks, the write norm, and the clipped step
            b_nd = tl.sum(tl.zeros([BH], dtype=tl.float32), axis=0)
            for jb in range(0, NH):
                off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)  # [BK, BH], [BH, BV]
                b_a1 = tl.load(A1 + base1 + off1, mask=m1, other=0.0)
                b_a2 = tl.load(A2 + base2 + off2, mask=m2, other=0.0)
                _, b_d1, _ = activation(tl.sum(b_k[:, None] * b_a1, axis=0), ACT)  # [BH]
                b_delta = tl.sum(b_a2 * b_err[None, :], axis=1) * b_d1  # [BH]
                b_nd += tl.sum(b_delta * b_delta)
            b_norm = tl.sqrt(tl.sum(b_k * b_k) * b_nd + b_nh * tl.sum(b_err * b_err))
            b_th, clipped = clip_step(b_th, b_norm, max_norm)

        # (2) write, then read with the new weights
        b_o = tl.zeros([BV], dtype=tl.float32)
        for jb in range(0, NH):
            off1, m1, off2, m2 = block_offsets(jb, rk, rv, rb, mk, mv, K, V, Dh, BH)  # [BK, BH], [BH, BV]
            b_a1 = tl.load(A1 + base1 + off1, mask=m1, other=0.0)
            b_a2 = tl.load(A2 + base2 + off2, mask=m2, other=0.0)
            b_W1 = tl.load(W1 + base1 + off1, mask=m1, other=0.0)  # [BK, BH]
            b_S1 = tl.load(S1 + base1 + off1, mask=m1, other=0.0)
            b_W2 = tl.load(W2 + base2 + off2, mask=m2, other=0.0)  # [BH, BV]
            b_S2 = tl.load(S2 + base2 + off2, mask=m2, other=0.0)
            b_hk, b_d1, _ = activation(tl.sum(b_k[:, None] * b_a1, axis=0), ACT)  # [BH]
            b_delta = tl.sum(b_a2 * b_err[None, :], axis=1) * b_d1  # [BH]
            b_S1 = b_e * b_S1 - b_th * (b_k[:, None] * b_delta[None, :])
            b_W1 = b_a * b_W1 + b_S1
            b_S2 = b_e * b_S2 - b_th * (b_hk[:, None] * b_err[None, :])
            b_W2 = b_a * b_W2 + b_S2
            b_hq, _, _ = activation(tl.sum(b_q[:, None] * b_W1, axis=0), ACT)  # [BH]
            b_o += tl.sum(b_hq[:, None] * b_W2, axis=0)
            tl.debug_barrier()  # every thread has read this block before any rewrites it
            tl.store(W1 + base1 + off1, b_W1, mask=m1)
            tl.store(S1 + base1 + off1, b_S1, mask=m1)
            tl.store(W2 + base2 + off2, b_W2, mask=m2)
            tl.store(S2 + base2 + off2, b_S2, mask=m2)
        tl.debug_barrier()  # the next token reads the new state from other threads
        if RESIDUAL:
            b_o += b_q
        tl.store(o + (t * H + h) * V + rv, b_o.to(o.dtype.element_ty), mask=mv)
        off = (off + 1) % C


def fused_recurrent_fwd(q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens, plan: ChunkPlan,
                        act: int, residual: bool, max_norm: float | None):
    """Launch the decode kernel. Shapes as :func:`chunk.chunk_fwd` (``max_norm``: the clipping
    bound or None); returns o ``[B, T, H, V]`` and the final ``(W1, W2, S1, S2, A1, A2)`` float32
    (A: the last chunk's anchor)."""
    s = plan.shape
    Dh = W1.shape[-1]
    launch = mlp_launch(plan.chunk_size, s.K, s.V, Dh, q.dtype, gpu_of(q), kernels=())
    o = torch.empty_like(v)
    W1T, W2T, S1T, S2T, A1T, A2T = (x.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
                                    for x in (W1, W2, S1, S2, A1, A2))
    cu, is_varlen = varlen_args(cu_seqlens, offset)
    if s.N * s.H > 0:
        with explained_launch("the MLP-memory decode kernel", q, s.K, s.V, None):
            fused_recurrent_mlp_memory_fwd_kernel[(s.N * s.H,)](
                q, k, v, alpha, eta, theta, offset, cu, o, W1T, S1T, A1T, W2T, S2T, A2T,
                s.T, 0.0 if max_norm is None else max_norm, H=s.H, K=s.K, V=s.V, Dh=Dh, C=plan.chunk_size, BK=launch.BK,
                BV=launch.BV, BH=launch.fwd_BH, ACT=act, RESIDUAL=residual, IS_VARLEN=is_varlen,
                CLIP=max_norm is not None, num_warps=launch.decode_warps, num_stages=launch.decode_stages)
    return o, (W1T, W2T, S1T, S2T, A1T, A2T)


class FusedRecurrentMLPMemoryFunction(torch.autograd.Function):
    """Decode kernel forward; chunkwise (or naive_chunk) backward."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens, plan, act, residual,
                max_norm, save):
        o, final = fused_recurrent_fwd(q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens, plan,
                                       act, residual, max_norm)
        if save:
            ctx.save_for_backward(q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens)
            ctx.plan, ctx.act, ctx.residual, ctx.max_norm = plan, act, residual, max_norm
        return (o, *final)

    @staticmethod
    def backward(ctx, do, dW1T, dW2T, dS1T, dS2T, dA1T, dA2T):
        q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens = ctx.saved_tensors
        plan, act, residual, max_norm = ctx.plan, ctx.act, ctx.residual, ctx.max_norm
        if plan.chunk_size in KERNEL_CHUNK_SIZES:
            *_, tiles, norms = chunk_fwd(q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens,
                                         plan, act, residual, store_tiles=True, max_norm=max_norm)
            grads = chunk_bwd(q, k, v, alpha, eta, theta, A1, A2, offset, cu_seqlens, plan, tiles, do,
                              dW1T, dW2T, dS1T, dS2T, dA1T, dA2T, act, residual, norms, max_norm)
            return (*grads, None, None, None, None, None, None, None)
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in (q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2)]
            state = MLPMemoryState(*inputs[6:], offset=offset, chunk_size=plan.chunk_size)
            o, final = naive_chunk_mlp_memory(*inputs[:6], chunk_size=plan.chunk_size, initial_state=state,
                                              output_final_state=True, cu_seqlens=cu_seqlens,
                                              activation=ACTIVATIONS[act], residual=residual,
                                              max_update_norm=max_norm)
            # the kernel's last anchor buffer is the naive state's anchor where a chunk is open
            mid = (final.offset != 0).view(-1, 1, 1, 1)
            outputs = (o, final.W1, final.W2, final.S1, final.S2, final.anchor1, final.anchor2)
            cotangents = (do, dW1T, dW2T, dS1T, dS2T, dA1T, dA2T)
            pairs = [(x, g if i < 5 else torch.where(mid, g, 0.0)) for i, (x, g) in enumerate(zip(outputs, cotangents))
                     if g is not None and x.requires_grad]
            grads = [None] * len(inputs)
            if pairs:
                outs, cots = zip(*pairs)
                grads = torch.autograd.grad(outs, inputs, cots, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        return (*grads, None, None, None, None, None, None, None)


@traceable("mlp_memory", "fused_recurrent")
def fused_recurrent_mlp_memory(q, k, v, alpha, eta, theta, *, chunk_size: int = 16, initial_state=None,
                               output_final_state: bool = False, cu_seqlens=None, activation: str = "silu",
                               residual: bool = False,
                               max_update_norm: float | None = None):
    """MLP-memory update, one token at a time in a Triton kernel (decoding).

    Meant for one or a few tokens per call with ``initial_state`` from a previous call; any
    length works. Same arguments, returns and results as :func:`chunk_mlp_memory`, except that
    ``chunk_size`` may be any int >= 1. Differentiable (chunkwise backward, or autograd through
    ``naive_chunk_mlp_memory`` for chunk sizes other than 16, 32, 64). ``max_update_norm``: None or
    a bound on each token's write (``ops/common/clipping.py``).

    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; alpha, eta, theta ``[B, T, H]``;
    initial_state W1 ``[N or 1, H, K, Dh]``, W2 ``[N or 1, H, Dh, V]`` (required); returns o
    ``[B, T, H, V]`` in q's dtype and optionally a float32 :class:`MLPMemoryState`.
    """
    # the decode kernel; with gradients at a kernel chunk size the backward runs both chunk kernels
    chunk_kernels = lambda grad: ("fwd", "bwd") if grad and chunk_size in KERNEL_CHUNK_SIZES else ()
    inputs, states, offset, plan, act, grad = prepare_kernel_call(
        "fused_recurrent_mlp_memory", q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens, activation,
        residual, max_update_norm, None, chunk_kernels)
    o, *final = FusedRecurrentMLPMemoryFunction.apply(*inputs, *states, offset, cu_seqlens, plan, act, residual,
                                                      check_max_update_norm(max_update_norm), grad)
    return o, (pack_final_state(*final, plan) if output_final_state else None)
