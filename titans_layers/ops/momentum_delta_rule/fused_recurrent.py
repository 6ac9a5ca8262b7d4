"""``fused_recurrent_momentum_delta_rule``: the Triton token-by-token kernel, for decoding.

One program per (block of V columns, sequence, head) keeps ``(M, S, anchor)`` ``[K, BV]`` in
registers and applies the update one token at a time, refreshing the anchor whenever the state
sits on a chunk boundary. It reproduces the chunked forward exactly at any split point, so a
prefill with ``chunk_momentum_delta_rule`` followed by decoding with this op equals one long call.

Gradients: the backward is the chunkwise backward (``chunk.py``), which recomputes the tile-start
states; for chunk sizes the chunk kernels do not take it differentiates ``naive_chunk`` instead.

Update clipping (``max_update_norm``, constexpr ``CLIP``): as in the chunk kernels
(``chunk_kernels`` docstring), token t's step becomes ``c / (|k_t| |e_t|)`` where
``theta_t |k_t| |e_t| > c``, with ``e_t`` the error at the anchor; ``|e_t|`` needs all of V, so a
clipped call runs one V block per program. The backward reruns the chunk forward, whose stored
norms decide the clipping there (the same formula; its ``e`` may round differently from this
kernel's, which matters only for a token on the bound to within rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from titans_layers.ops.common.clipping import check_max_update_norm
from titans_layers.ops.common.traceable import traceable
from titans_layers.ops.common.triton_utils import clip_step, explained_launch, sequence_range
from titans_layers.ops.momentum_delta_rule.chunk import (KERNEL_CHUNK_SIZES, ChunkPlan, chunk_bwd, chunk_fwd,
                                                         launch_blocks, decode_warps, pack_final_state,
                                                         prepare_kernel_call, varlen_args)
from titans_layers.ops.momentum_delta_rule.chunk_kernels import load_token, write_norm
from titans_layers.ops.momentum_delta_rule.naive import naive_chunk_momentum_delta_rule
from titans_layers.ops.momentum_delta_rule.state import MomentumDeltaRuleState

# software-pipelining stages of the decode kernel's launch (Triton's default; the compile check uses it)
DECODE_STAGES = 3


@triton.jit
def fused_recurrent_momentum_delta_rule_fwd_kernel(
    q, k, v, alpha, eta, theta,  # [B*T, H, K|V], gates [B*T, H]
    M0, S0, W0, offset, cu_seqlens,  # initial state [N, H, K, V] float32; offset [N]; [N + 1]
    o, MT, ST, WT,  # [B*T, H, V]; final state [N, H, K, V] float32
    T, max_norm,  # sequence length; the bound c on each write (read when CLIP)
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, CLIP: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, h = i_nh // H, i_nh % H
    bos, eos = sequence_range(cu_seqlens, i_n, T, IS_VARLEN)
    off = tl.load(offset + i_n).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    s_off = ((i_n * H + h) * K + rk[:, None]).to(tl.int64) * V + rv[None, :]  # [BK, BV]
    s_mask = mk[:, None] & mv[None, :]
    b_M = tl.load(M0 + s_off, mask=s_mask, other=0.0)
    b_S = tl.load(S0 + s_off, mask=s_mask, other=0.0)
    b_W = tl.load(W0 + s_off, mask=s_mask, other=0.0)
    for t in range(bos, eos):
        b_W = tl.where(off == 0, b_M, b_W)  # a new chunk takes its gradients at the current weights
        b_q, b_k, b_v, b_a, b_e, b_th = load_token(q, k, v, alpha, eta, theta, t, h, H, K, V, rk, rv, mk, mv)
        b_u = tl.sum(b_k[:, None] * b_W, axis=0) - b_v  # [BV] error at the anchor
        if CLIP:  # one V block holds all of V
            b_th, _ = clip_step(b_th, write_norm(tl.sum(b_k * b_k), tl.sum(b_u * b_u)), max_norm)
        b_S = b_e * b_S - b_th * (b_k[:, None] * b_u[None, :])
        b_M = b_a * b_M + b_S
        b_o = tl.sum(b_q[:, None] * b_M, axis=0)  # [BV]
        tl.store(o + (t * H + h) * V + rv, b_o.to(o.dtype.element_ty), mask=mv)
        off = (off + 1) % C
    tl.store(MT + s_off, b_M, mask=s_mask)
    tl.store(ST + s_off, b_S, mask=s_mask)
    tl.store(WT + s_off, tl.where(off == 0, b_M, b_W), mask=s_mask)


def fused_recurrent_fwd(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan: ChunkPlan,
                        max_update_norm: float | None = None):
    """Launch the decode kernel. Returns o ``[B, T, H, V]`` and the final ``(M, S, anchor)``."""
    s = plan.shape
    clip = max_update_norm is not None
    BK, BV, NV = launch_blocks(s.K, s.V, clip)
    o = torch.empty_like(v)
    MT, ST, WT = (torch.empty(s.N, s.H, s.K, s.V, dtype=torch.float32, device=q.device) for _ in range(3))
    cu, is_varlen = varlen_args(cu_seqlens, offset)
    with explained_launch("the momentum-delta-rule decode kernel", q, s.K, s.V, None):
        fused_recurrent_momentum_delta_rule_fwd_kernel[(NV, s.N * s.H)](
            q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu, o, MT, ST, WT, s.T, max_update_norm if clip else 0.0,
            H=s.H, K=s.K, V=s.V, C=plan.chunk_size, BK=BK, BV=BV, IS_VARLEN=is_varlen, CLIP=clip,
            num_warps=decode_warps(BK, BV), num_stages=DECODE_STAGES)
    return o, MT, ST, WT


class FusedRecurrentMomentumDeltaRuleFunction(torch.autograd.Function):
    """Decode kernel forward; chunkwise (or naive_chunk) backward. ``setup_context`` style, so
    ``torch.func`` transforms work."""

    @staticmethod
    def forward(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan, max_update_norm):
        return fused_recurrent_fwd(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan, max_update_norm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, plan, max_update_norm = inputs
        ctx.save_for_backward(*tensors)
        ctx.plan, ctx.max_update_norm = plan, max_update_norm

    @staticmethod
    def backward(ctx, do, dMT, dST, dWT):
        q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens = ctx.saved_tensors
        plan, clip = ctx.plan, ctx.max_update_norm
        if plan.chunk_size in KERNEL_CHUNK_SIZES:
            *_, tile_M, tile_S, norms = chunk_fwd(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan,
                                                  store_tiles=True, max_update_norm=clip)
            grads = chunk_bwd(q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, plan, tile_M, tile_S,
                              do, dMT, dST, dWT, max_update_norm=clip, norms=norms)
            return (*grads, None, None, None, None)
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in (q, k, v, alpha, eta, theta, M0, S0, W0)]
            state = MomentumDeltaRuleState(M=inputs[6], S=inputs[7], anchor=inputs[8], offset=offset,
                                           chunk_size=plan.chunk_size)
            o, final = naive_chunk_momentum_delta_rule(*inputs[:6], chunk_size=plan.chunk_size, initial_state=state,
                                                       output_final_state=True, cu_seqlens=cu_seqlens,
                                                       max_update_norm=clip)
            pairs = [(x, g) for x, g in ((o, do), (final.M, dMT), (final.S, dST), (final.anchor, dWT))
                     if g is not None and x.requires_grad]
            grads = [None] * len(inputs)
            if pairs:
                outputs, cotangents = zip(*pairs)
                grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        return (*grads, None, None, None, None)


@traceable("momentum_delta_rule", "fused_recurrent")
def fused_recurrent_momentum_delta_rule(q, k, v, alpha, eta, theta, *, chunk_size: int = 16, initial_state=None,
                                        output_final_state: bool = False, cu_seqlens=None,
                                        max_update_norm: float | None = None):
    """Gated momentum-delta update (linear memory), one token at a time in a Triton kernel.

    Meant for decoding one or a few tokens per call with ``initial_state`` from a previous call;
    any sequence length works. Same arguments, returns and results as
    :func:`chunk_momentum_delta_rule`, except that ``chunk_size`` may be any int >= 1.
    Differentiable (through the chunkwise backward). ``max_update_norm``: None, or the bound on
    each token's write, as in :func:`chunk_momentum_delta_rule` (a clipped call holds all of V in
    one block).

    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; alpha, eta, theta ``[B, T, H]``;
    returns o ``[B, T, H, V]`` and optionally a :class:`MomentumDeltaRuleState`.
    """
    clip = check_max_update_norm(max_update_norm)
    inputs, states, offset, plan = prepare_kernel_call("fused_recurrent_momentum_delta_rule", q, k, v, alpha, eta,
                                                       theta, chunk_size, initial_state, cu_seqlens, None)
    o, MT, ST, WT = FusedRecurrentMomentumDeltaRuleFunction.apply(*inputs, *states, offset, cu_seqlens, plan, clip)
    return o, (pack_final_state(MT, ST, WT, plan, q.device) if output_final_state else None)
