"""``chunk_momentum_delta_rule``: Triton chunkwise forward and backward behind an autograd.Function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from titans_layers.ops.common.clipping import check_max_update_norm
from titans_layers.ops.common.grad_mode import needs_grad
from titans_layers.ops.common.layout import sequence_lengths
from titans_layers.ops.common.traceable import traceable
from titans_layers.ops.common.triton_utils import (block_sizes, check_head_dims, check_triton_device, dot_precision,
                                                   launch_first_fitting, narrower_blocks, runnable_precision)
from titans_layers.ops.common.validation import OpShape, check_chunk_size, check_op_inputs
from titans_layers.ops.momentum_delta_rule.chunk_kernels import (chunk_momentum_delta_rule_bwd_kernel,
                                                                 chunk_momentum_delta_rule_fwd_kernel)
from titans_layers.ops.momentum_delta_rule.chunk_split_kernels import (chunk_momentum_delta_rule_bwd_split_kernel,
                                                                       chunk_momentum_delta_rule_fwd_split_kernel)
from titans_layers.ops.momentum_delta_rule.state import MomentumDeltaRuleState, resolve_initial_state

KERNEL_CHUNK_SIZES = (16, 32, 64)
MAX_TILE = 32
# Largest [BK, BV] state tile the clipped backward keeps in one block (registers): beyond it the
# single-block backward needs more shared memory than an A100 or H100 block has (float32 at
# 128 x 64), so it walks V in sub-blocks of the unclipped width instead (the split kernel).
CLIP_BWD_MAX_TILE = 64 * 64


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


def launch_blocks(K: int, V: int, clip: bool) -> tuple[int, int, int]:
    """(BK, BV, NV). Clipping needs each token's error norm over all of V, so it takes one V block
    (``chunk_kernels`` module docstring); without it V splits into blocks of ``block_sizes``.
    These are the widest blocks; on a GPU with less shared memory a block the chunk kernels may
    take narrower ones (:func:`forward_candidates`, :func:`backward_candidates`)."""
    BK, BV = block_sizes(K, V)
    if clip:
        BV = max(16, triton.next_power_of_2(V))
    return BK, BV, triton.cdiv(V, BV)


FWD_KERNEL = "the momentum-delta-rule chunk forward kernel"
FWD_SPLIT_KERNEL = "the momentum-delta-rule split chunk forward kernel"
BWD_KERNEL = "the momentum-delta-rule chunk backward kernel"
BWD_SPLIT_KERNEL = "the momentum-delta-rule split chunk backward kernel"


def forward_candidates(K: int, V: int, clip: bool) -> list[tuple[str, tuple[bool, int]]]:
    """The forward's launches to try, widest V block first: ``(kernel, (split, BV))`` (a GPU takes
    the first that fits, :func:`~titans_layers.ops.common.triton_utils.launch_first_fitting`).
    Unclipped, the V blocks of :func:`launch_blocks` and each half down to 16. Clipped, all of V in
    one block, then the split kernel walking V in sub-blocks of ``block_sizes``' width and each
    half of it down to 16 (on GPUs with 99 KB a block above K = V = 64)."""
    _, BV, _ = launch_blocks(K, V, clip)
    if not clip:
        return [(FWD_KERNEL, (False, b)) for b in narrower_blocks(BV)]
    return [(FWD_KERNEL, (False, BV))] + [(FWD_SPLIT_KERNEL, (True, b)) for b in narrower_blocks(block_sizes(K, V)[1])]


def backward_candidates(K: int, V: int, clip: bool) -> list[tuple[str, tuple[bool, int]]]:
    """The backward's launches to try, widest first: ``(kernel, (split, BV))``. Unclipped, the V
    blocks of ``block_sizes`` and each half down to 16. Clipped: all of V in one block when its
    state tile is at most ``CLIP_BWD_MAX_TILE``, then the split kernel walking V in sub-blocks of
    ``block_sizes``' width and each half of it down to 16 (sm_80 / sm_90 take the first; GPUs with
    99 KB a block take narrower ones at float32, and with clipping above K = V = 64)."""
    BK, BV = block_sizes(K, V)
    if not clip:
        return [(BWD_KERNEL, (False, b)) for b in narrower_blocks(BV)]
    whole = max(16, triton.next_power_of_2(V))
    single = [(BWD_KERNEL, (False, whole))] if BK * whole <= CLIP_BWD_MAX_TILE else []
    return single + [(BWD_SPLIT_KERNEL, (True, b)) for b in narrower_blocks(BV)]


def chunk_warps(BT: int, BK: int, fp32: bool, split_forward: bool = False) -> int:
    """Warps per program of the chunk kernels. Their tile-long ``[BT, K]`` operands and accumulators
    ask for more registers than a thread has: 8 warps spill less than 4. Float32 operands
    (``fp32``) in 32-token tiles with K blocks of 64 and more take 16: at 8 ptxas falls back to 32
    registers a thread and spills several times more. Not the split forward (``split_forward``),
    which spills more at 16 than at 8, nor 16-token tiles or bf16 (no fallback at 8). Static
    figures (``benchmarks.kernel_resources``): docs/kernels.md."""
    return 16 if fp32 and BT >= 32 and BK >= 64 and not split_forward else 8


def decode_warps(BK: int, BV: int) -> int:
    """Warps per program of the decode kernel: 4, or 16 for the state tiles beyond 64 x 64 that only
    clipping launches (K, V > 64 in one V block): at 8 ptxas falls back to 32 registers and spills
    more (figures: docs/kernels.md)."""
    return 16 if BK * BV > 64 * 64 else 4


def varlen_args(cu_seqlens, unused: torch.Tensor):
    """The kernels' ``cu_seqlens`` argument and ``IS_VARLEN``: a contiguous ``cu_seqlens`` (the
    kernels index it as ``cu_seqlens + i``, so a strided view would be read out of bounds), or
    ``unused`` (any integer tensor on the device) without packed sequences."""
    if cu_seqlens is None:
        return unused, False
    return cu_seqlens.contiguous(), True


def chunk_fwd(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan: ChunkPlan, store_tiles: bool,
              max_update_norm: float | None = None):
    """Launch the forward kernel (the first of :func:`forward_candidates` that fits the GPU's
    shared memory). Returns o ``[B, T, H, V]``, the final ``(M, S, anchor)``,
    when ``store_tiles`` the tile-start states ``[n_tiles, H, K, V]`` (else None), and when
    ``store_tiles`` and clipping each token's gradient norm ``[B, T, H]`` float32 (else None)."""
    s = plan.shape
    clip = max_update_norm is not None
    BK = block_sizes(s.K, s.V)[0]
    precision = runnable_precision(dot_precision(q.dtype))
    fp32 = q.dtype == torch.float32
    o = torch.empty_like(v)
    MT, ST, WT = (torch.empty(s.N, s.H, s.K, s.V, dtype=torch.float32, device=q.device) for _ in range(3))
    if store_tiles:
        tile_M = torch.empty(plan.n_tiles, s.H, s.K, s.V, dtype=torch.float32, device=q.device)
        tile_S = torch.empty_like(tile_M)
    else:
        tile_M = tile_S = MT  # never written
    keep_norms = store_tiles and clip
    norms = torch.empty(alpha.shape, dtype=torch.float32, device=q.device) if keep_norms else MT  # else unused
    cu, is_varlen = varlen_args(cu_seqlens, plan.tile_indptr)

    def launch(config: tuple[bool, int]) -> None:
        split, BV = config
        if split:
            chunk_momentum_delta_rule_fwd_split_kernel[(1, s.N * s.H)](
                q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu, plan.tile_indptr, o, MT, ST, WT, tile_M, tile_S,
                norms, s.T, max_update_norm, H=s.H, K=s.K, V=s.V, C=plan.chunk_size, BT=plan.tile_size, BK=BK, BV=BV,
                NVS=triton.cdiv(s.V, BV), IS_VARLEN=is_varlen, STORE_TILES=store_tiles, PRECISION=precision,
                num_warps=chunk_warps(plan.tile_size, BK, fp32, split_forward=True), num_stages=1)
        else:
            chunk_momentum_delta_rule_fwd_kernel[(triton.cdiv(s.V, BV), s.N * s.H)](
                q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu, plan.tile_indptr, o, MT, ST, WT, tile_M, tile_S,
                norms, s.T, max_update_norm if clip else 0.0, H=s.H, K=s.K, V=s.V, C=plan.chunk_size,
                BT=plan.tile_size, BK=BK, BV=BV, IS_VARLEN=is_varlen, STORE_TILES=store_tiles, PRECISION=precision,
                CLIP=clip, num_warps=chunk_warps(plan.tile_size, BK, fp32), num_stages=1)

    launch_first_fitting(("linear fwd", s.K, s.V, q.dtype, plan.tile_size, clip), forward_candidates(s.K, s.V, clip),
                         launch, q, s.K, s.V, plan.chunk_size)
    return (o, MT, ST, WT, (tile_M if store_tiles else None), (tile_S if store_tiles else None),
            (norms if keep_norms else None))


def chunk_bwd(q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, plan: ChunkPlan, tile_M, tile_S,
              do, dMT, dST, dWT, max_update_norm: float | None = None, norms=None):
    """Launch the backward kernel. Returns the gradients of q, k, v, alpha, eta, theta and of the
    initial ``(M, S, anchor)`` (float32). Clipping takes the forward's per-token ``norms`` and one
    program per (sequence, head): all of V in one block up to ``CLIP_BWD_MAX_TILE`` state
    elements, else the split kernel (V in sub-blocks of ``block_sizes``' width). The launch is the
    first of :func:`backward_candidates` that fits the GPU's shared memory."""
    s = plan.shape
    clip = max_update_norm is not None
    if clip and norms is None:
        raise RuntimeError("the clipped backward needs the per-token norms its forward stored")
    BK = block_sizes(s.K, s.V)[0]
    precision = runnable_precision(dot_precision(q.dtype))
    fp32 = q.dtype == torch.float32
    n_tokens = s.B * s.T
    state = (s.N, s.H, s.K, s.V)
    zeros = lambda x: torch.zeros(state, dtype=torch.float32, device=q.device) if x is None else x.float().contiguous()
    dMT, dST, dWT = zeros(dMT), zeros(dST), zeros(dWT)
    do = do.contiguous()
    dv = torch.empty_like(v)
    dM0, dS0, dW0 = (torch.empty(state, dtype=torch.float32, device=q.device) for _ in range(3))
    cu, is_varlen = varlen_args(cu_seqlens, plan.tile_indptr)

    def launch(config: tuple[bool, int]):
        split, BV = config
        # one partial of dq, dk and the gates per program along V (one program holds all of V when
        # clipping), summed below: [NV, B, T, H, K], [NV, B, T, H]
        NV = 1 if clip else triton.cdiv(s.V, BV)
        dq = q.new_empty(NV, *q.shape, dtype=torch.float32)
        dk = q.new_empty(NV, *k.shape, dtype=torch.float32)
        dalpha, deta, dtheta = (q.new_empty(NV, *alpha.shape, dtype=torch.float32) for _ in range(3))
        if split:
            chunk_momentum_delta_rule_bwd_split_kernel[(1, s.N * s.H)](
                q, k, v, alpha, eta, theta, W0, offset, cu, plan.tile_indptr, tile_M, tile_S, do,
                dMT, dST, dWT, dq, dk, dv, dalpha, deta, dtheta, dM0, dS0, dW0, norms, s.T, max_update_norm,
                H=s.H, K=s.K, V=s.V, C=plan.chunk_size, BT=plan.tile_size, BK=BK, BV=BV, NVS=triton.cdiv(s.V, BV),
                IS_VARLEN=is_varlen, PRECISION=precision, num_warps=chunk_warps(plan.tile_size, BK, fp32),
                num_stages=1)
        else:
            chunk_momentum_delta_rule_bwd_kernel[(NV, s.N * s.H)](
                q, k, v, alpha, eta, theta, W0, offset, cu, plan.tile_indptr, tile_M, tile_S, do,
                dMT, dST, dWT, dq, dk, dv, dalpha, deta, dtheta, dM0, dS0, dW0, norms if clip else dM0,
                s.T, n_tokens, max_update_norm if clip else 0.0, H=s.H, K=s.K, V=s.V, C=plan.chunk_size,
                BT=plan.tile_size, BK=BK, BV=BV, IS_VARLEN=is_varlen, PRECISION=precision, CLIP=clip,
                num_warps=chunk_warps(plan.tile_size, BK, fp32), num_stages=1)
        return dq, dk, dalpha, deta, dtheta

    dq, dk, dalpha, deta, dtheta = launch_first_fitting(
        ("linear bwd", s.K, s.V, q.dtype, plan.tile_size, clip), backward_candidates(s.K, s.V, clip), launch, q,
        s.K, s.V, plan.chunk_size)
    return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dalpha.sum(0).to(alpha.dtype),
            deta.sum(0).to(eta.dtype), dtheta.sum(0).to(theta.dtype), dM0, dS0, dW0)


class ChunkMomentumDeltaRuleFunction(torch.autograd.Function):
    """Forward and backward through the Triton chunk kernels; the backward recomputes each tile
    from the tile-start states (and, when clipping, the per-token norms) the forward stored (only
    when ``store_tiles``: a gradient is needed). Written with ``setup_context`` so ``torch.func``
    transforms (used under ``torch.compile``) work."""

    @staticmethod
    def forward(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan, store_tiles, max_update_norm):
        return chunk_fwd(q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan, store_tiles=store_tiles,
                         max_update_norm=max_update_norm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, alpha, eta, theta, M0, S0, W0, offset, cu_seqlens, plan, store_tiles, max_update_norm = inputs
        *_, tile_M, tile_S, norms = output
        if store_tiles:
            ctx.save_for_backward(q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, tile_M, tile_S, norms)
        ctx.plan, ctx.store_tiles, ctx.max_update_norm = plan, store_tiles, max_update_norm
        ctx.mark_non_differentiable(*(t for t in (tile_M, tile_S, norms) if t is not None))

    @staticmethod
    def backward(ctx, do, dMT, dST, dWT, *_):
        if not ctx.store_tiles:
            raise RuntimeError("chunk_momentum_delta_rule ran without keeping its tile states (no input needed a "
                               "gradient at call time), so it cannot be differentiated")
        q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, tile_M, tile_S, norms = ctx.saved_tensors
        grads = chunk_bwd(q, k, v, alpha, eta, theta, W0, offset, cu_seqlens, ctx.plan, tile_M, tile_S,
                          do, dMT, dST, dWT, max_update_norm=ctx.max_update_norm, norms=norms)
        return (*grads, None, None, None, None, None)


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
        max_update_norm: None, or a bound ``c`` on each token's write ``||theta_t G_t||_F``: the
            step becomes ``theta_t * min(1, c / (theta_t ||G_t||_F))`` with G_t the gradient at
            the chunk's anchor (:mod:`titans_layers.ops.common.clipping`), forward and backward.
            A clipped call runs one program per (sequence, head) holding all of V (see
            ``chunk_kernels``).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state a float32
        :class:`MomentumDeltaRuleState` or None. Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
    """
    clip = check_max_update_norm(max_update_norm)
    inputs, states, offset, plan = prepare_kernel_call("chunk_momentum_delta_rule", q, k, v, alpha, eta, theta,
                                                       chunk_size, initial_state, cu_seqlens, KERNEL_CHUNK_SIZES)
    o, MT, ST, WT, *_ = ChunkMomentumDeltaRuleFunction.apply(*inputs, *states, offset, cu_seqlens, plan,
                                                             needs_grad(*inputs, *states), clip)
    return o, (pack_final_state(MT, ST, WT, plan, q.device) if output_final_state else None)
