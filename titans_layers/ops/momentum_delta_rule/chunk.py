"""``chunk_momentum_delta_rule``: Triton chunkwise forward and backward behind an autograd.Function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from titans_layers.ops.common.clipping import reject_clipping
from titans_layers.ops.common.layout import sequence_lengths
from titans_layers.ops.common.traceable import traceable
from titans_layers.ops.common.triton_utils import block_sizes, check_head_dims, check_triton_device, dot_precision
from titans_layers.ops.common.validation import OpShape, check_chunk_size, check_op_inputs
from titans_layers.ops.momentum_delta_rule.chunk_kernels import (chunk_momentum_delta_rule_bwd_kernel,
                                                                 chunk_momentum_delta_rule_fwd_kernel)
from titans_layers.ops.momentum_delta_rule.state import MomentumDeltaRuleState, resolve_initial_state

KERNEL_CHUNK_SIZES = (16, 32, 64)
MAX_TILE = 32


@dataclass
class ChunkPlan:
    """Host-side sizes of one call: sequences, the kernels' tile size, and where each sequence's
    tiles sit in the per-tile state buffers."""

    shape: OpShape
    chunk_size: int
    tile_size: int  # BT: tokens per kernel tile, divides chunk_size
    lengths: list[int]
    offsets: list[int]
    tile_indptr: torch.Tensor  # [N + 1] int64, first tile of each sequence
    n_tiles: int  # tiles over all sequences

    @property
    def final_offsets(self) -> list[int]:
        return [(o + n) % self.chunk_size for o, n in zip(self.offsets, self.lengths)]


def tile_size(chunk_size: int) -> int:
    """Tokens per kernel tile: the chunk, or 32-token pieces of it (on-chip memory grows with the
    tile, not the chunk: a 64-token tile of the backward does not fit an H100's shared memory)."""
    return min(chunk_size, MAX_TILE)


def make_plan(shape: OpShape, chunk_size: int, offsets: list[int], cu_seqlens, device,
              tile: int | None = None) -> ChunkPlan:
    """Sizes of one call; tiles are counted from the chunk start before each sequence's first token.
    ``tile``: tokens per kernel tile (default :func:`tile_size`; a family may pick its own)."""
    lengths = sequence_lengths(shape.B, shape.T, cu_seqlens)
    BT = tile or tile_size(chunk_size)
    counts = [-(-(o + n) // BT) - o // BT for o, n in zip(offsets, lengths)]
    indptr = [0]
    for c in counts:
        indptr.append(indptr[-1] + c)
    return ChunkPlan(shape, chunk_size, BT, lengths, offsets, torch.tensor(indptr, dtype=torch.long, device=device),
                     indptr[-1])


def varlen_args(cu_seqlens, plan: ChunkPlan):
    """The kernels' ``cu_seqlens`` argument (any long tensor when unused) and ``IS_VARLEN``."""
    return (cu_seqlens if cu_seqlens is not None else plan.tile_indptr), cu_seqlens is not None


def chunk_fwd(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan: ChunkPlan, store_tiles: bool):
    """Launch the forward kernel. Returns o ``[B, T, H, V]``, the final ``(M, S, anchor)`` and,
    when ``store_tiles``, the tile-start states ``[n_tiles, H, K, V]`` (else None)."""
    s = plan.shape
    BK, BV = block_sizes(s.K, s.V)
    NV = triton.cdiv(s.V, BV)
    o = torch.empty_like(v)
    MT, ST, WT = (torch.empty(s.N, s.H, s.K, s.V, dtype=torch.float32, device=q.device) for _ in range(3))
    if store_tiles:
        tile_M = torch.empty(plan.n_tiles, s.H, s.K, s.V, dtype=torch.float32, device=q.device)
        tile_S = torch.empty_like(tile_M)
    else:
        tile_M = tile_S = MT  # never written
    cu, is_varlen = varlen_args(cu_seqlens, plan)
    chunk_momentum_delta_rule_fwd_kernel[(NV, s.N * s.H)](
        q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu, plan.tile_indptr, o, MT, ST, WT, tile_M, tile_S,
        s.T, H=s.H, K=s.K, V=s.V, C=plan.chunk_size, BT=plan.tile_size, BK=BK, BV=BV, IS_VARLEN=is_varlen,
        STORE_TILES=store_tiles, PRECISION=dot_precision(q.dtype), num_stages=1)
    return o, MT, ST, WT, (tile_M if store_tiles else None), (tile_S if store_tiles else None)


def chunk_bwd(q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, plan: ChunkPlan, tile_M, tile_S,
              do, dMT, dST, dWT):
    """Launch the backward kernel. Returns the gradients of q, k, v, alpha, eta, theta and of the
    initial ``(M, S, anchor)`` (float32)."""
    s = plan.shape
    BK, BV = block_sizes(s.K, s.V)
    NV = triton.cdiv(s.V, BV)
    n_tokens = s.B * s.T
    state = (s.N, s.H, s.K, s.V)
    zeros = lambda x: torch.zeros(state, dtype=torch.float32, device=q.device) if x is None else x.float().contiguous()
    dMT, dST, dWT = zeros(dMT), zeros(dST), zeros(dWT)
    dq = q.new_empty(NV, *q.shape, dtype=torch.float32)
    dk = q.new_empty(NV, *k.shape, dtype=torch.float32)
    dv = torch.empty_like(v)
    dalpha, deta, dtheta = (q.new_empty(NV, *alpha.shape, dtype=torch.float32) for _ in range(3))
    dM0, dS0, dW0 = (torch.empty(state, dtype=torch.float32, device=q.device) for _ in range(3))
    cu, is_varlen = varlen_args(cu_seqlens, plan)
    chunk_momentum_delta_rule_bwd_kernel[(NV, s.N * s.H)](
        q, k, v, alpha, eta, theta, W0, offset, cu, plan.tile_indptr, tile_M, tile_S, do.contiguous(),
        dMT, dST, dWT, dq, dk, dv, dalpha, deta, dtheta, dM0, dS0, dW0,
        s.T, n_tokens, H=s.H, K=s.K, V=s.V, C=plan.chunk_size, BT=plan.tile_size, BK=BK, BV=BV,
        IS_VARLEN=is_varlen, PRECISION=dot_precision(q.dtype), num_stages=1)
    return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dalpha.sum(0).to(alpha.dtype),
            deta.sum(0).to(eta.dtype), dtheta.sum(0).to(theta.dtype), dM0, dS0, dW0)


class ChunkMomentumDeltaRuleFunction(torch.autograd.Function):
    """Forward and backward through the Triton chunk kernels; the backward recomputes each tile
    from the tile-start states the forward stored (only when ``store_tiles``: a gradient is needed).
    Written with ``setup_context`` so ``torch.func`` transforms (used under ``torch.compile``) work."""

    @staticmethod
    def forward(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan, store_tiles):
        return chunk_fwd(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan, store_tiles=store_tiles)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan, store_tiles = inputs
        *_, tile_M, tile_S = output
        if store_tiles:
            ctx.save_for_backward(q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, tile_M, tile_S)
        ctx.plan, ctx.store_tiles = plan, store_tiles
        ctx.mark_non_differentiable(*(t for t in (tile_M, tile_S) if t is not None))

    @staticmethod
    def backward(ctx, do, dMT, dST, dWT, *_):
        if not ctx.store_tiles:
            raise RuntimeError("chunk_momentum_delta_rule ran without keeping its tile states (no input needed a "
                               "gradient at call time), so it cannot be differentiated")
        q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, tile_M, tile_S = ctx.saved_tensors
        grads = chunk_bwd(q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, ctx.plan, tile_M, tile_S,
                          do, dMT, dST, dWT)
        return (*grads, None, None, None, None)


def needs_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` from this call."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def prepare_kernel_call(op_name, q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens,
                        allowed_chunk_sizes):
    """Checks and state resolution shared by the Triton ops. Returns (contiguous inputs, state, plan)."""
    shape = check_op_inputs(q, k, v, alpha, eta, theta, cu_seqlens)
    C = check_chunk_size(chunk_size, allowed_chunk_sizes)
    if q.dtype == torch.float64:
        raise TypeError(f"`{op_name}` takes float32, bfloat16 or float16 inputs; use the naive_* ops for float64")
    check_head_dims(shape.K, shape.V)
    check_triton_device(op_name, q)
    init = resolve_initial_state(initial_state, shape, C, q.device)
    plan = make_plan(shape, C, init.offsets, cu_seqlens, q.device)
    inputs = tuple(x.contiguous() for x in (q, k, v, alpha, eta, theta))
    states = tuple(x.contiguous() for x in (init.M, init.S, init.anchor))
    return inputs, states, init.offset, plan


def pack_final_state(MT, ST, WT, plan: ChunkPlan, device) -> MomentumDeltaRuleState:
    offset = torch.tensor(plan.final_offsets, dtype=torch.long, device=device)
    return MomentumDeltaRuleState(M=MT, S=ST, anchor=WT, offset=offset, chunk_size=plan.chunk_size)


@traceable("momentum_delta_rule", "chunk")
def chunk_momentum_delta_rule(q, k, v, alpha, eta, theta, *, chunk_size: int = 16, initial_state=None,
                              output_final_state: bool = False, cu_seqlens=None,
                              max_update_norm: float | None = None):
    """Gated momentum-delta update (linear memory) with Triton chunkwise kernels, differentiable.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32, bfloat16 or float16; K, V <= 128).
        alpha, eta, theta: ``[B, T, H]`` forget gate, momentum decay, step size.
        chunk_size: 16, 32 or 64.
        initial_state: None, ``(M,)``, ``(M, S)`` or a :class:`MomentumDeltaRuleState`
            (weights ``[N or 1, H, K, V]``); receives gradients.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B == 1), or None.
        max_update_norm: must be None: update clipping is not in the kernels yet (ValueError).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state a float32
        :class:`MomentumDeltaRuleState` or None. Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
    """
    reject_clipping(max_update_norm, "chunk_momentum_delta_rule")
    inputs, states, offset, plan = prepare_kernel_call("chunk_momentum_delta_rule", q, k, v, alpha, eta, theta,
                                                       chunk_size, initial_state, cu_seqlens, KERNEL_CHUNK_SIZES)
    o, MT, ST, WT, _, _ = ChunkMomentumDeltaRuleFunction.apply(*inputs, *states, offset, cu_seqlens, plan,
                                                               needs_grad(*inputs, *states))
    return o, (pack_final_state(MT, ST, WT, plan, q.device) if output_final_state else None)
