"""``chunk_mlp_memory``: Triton chunkwise forward and backward of the MLP-memory update behind an
autograd.Function (kernel design: ``chunk_kernels.py``)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import triton

from titans_layers.ops.common.clipping import check_max_update_norm
from titans_layers.ops.common.grad_mode import needs_grad
from titans_layers.ops.common.traceable import traceable
from titans_layers.ops.common.triton_utils import (GPU, check_head_dims, check_triton_device, dot_precision,
                                                   explained_launch, gpu_of, runnable_precision,
                                                   shared_memory_error)
from titans_layers.ops.common.validation import check_chunk_size, check_op_inputs
from titans_layers.ops.mlp_memory.chunk_kernels import chunk_mlp_memory_bwd_kernel, chunk_mlp_memory_fwd_kernel
from titans_layers.ops.mlp_memory.naive import ACTIVATIONS, check_mlp_options
from titans_layers.ops.mlp_memory.state import MLPMemoryState, resolve_mlp_state
from titans_layers.ops.momentum_delta_rule.chunk import ChunkPlan, make_plan, varlen_args

KERNEL_CHUNK_SIZES = (16, 32, 64)


@dataclass(frozen=True)
class MLPLaunch:
    """How the MLP-memory kernels are launched for one problem size (:func:`mlp_launch`).

    ``BT``: tokens per kernel tile (it divides the chunk); ``BK``, ``BV``: the K and V tiles (all
    of each, a power of two >= 16, as ``tl.dot`` wants); ``fwd_BH``, ``bwd_BH``: hidden units per
    Dh block in the forward (and decode) and the backward kernel; ``*_warps``: warps per program;
    ``decode_stages``: software-pipelining stages of the decode kernel (the chunk kernels take 1);
    ``lowp_dots``: with bfloat16 / float16 inputs, the chunk kernels' ``tl.dot`` operands are
    rounded to the input dtype instead of running tf32 on float32 operands
    (:func:`~titans_layers.ops.common.triton_utils.dot_precision`); off until a GPU run shows it
    pays (``benchmark_mlp_memory --launches "default;lowp_dots=1"``).
    """

    BT: int
    BK: int
    BV: int
    fwd_BH: int
    bwd_BH: int
    fwd_warps: int = 8
    bwd_warps: int = 8
    decode_warps: int = 4
    decode_stages: int = 3
    lowp_dots: bool = False


_LAUNCH_OVERRIDE: dict = {}


# The backward's wider Dh blocks on sm_90 and later: (largest head dim, BH, shared memory it needs)
WIDE_BWD_BLOCKS = ((64, 64, 208 << 10), (128, 32, 200 << 10))

# Shared memory the chunk kernels need before sm_90 (Dh blocks of 32 forward, 16 backward; the most
# over forward, backward and clipping), by (float32 inputs, K or V above 64), per tile size BT
TILE_SHARED = {(False, False): {32: 76 << 10, 16: 50 << 10}, (False, True): {32: 148 << 10, 16: 94 << 10},
               (True, False): {32: 102 << 10, 16: 73 << 10}, (True, True): {16: 145 << 10}}
# ... and float32 inputs with K or V above 64 per kernel, the forward in Dh blocks of 16 (16-token tiles)
FP32_WIDE_SHARED = {"fwd": 97 << 10, "bwd": 117 << 10}


def mlp_launch(chunk_size: int, K: int, V: int, Dh: int, dtype: torch.dtype, gpu: GPU | None = None,
               kernels: tuple[str, ...] = ("fwd", "bwd")) -> MLPLaunch:
    """The launch of the MLP-memory kernels for chunk size C, head dims K, V, hidden width Dh, input
    dtype and GPU (:func:`~titans_layers.ops.common.triton_utils.gpu_of`; None under the
    interpreter, which takes the sm_80 launch), with any :func:`override_mlp_launch` fields in
    effect. ``kernels``: the chunk kernels the call launches, "fwd" and / or "bwd" (the decode
    kernel needs little shared memory and no check); only their needs are checked.

    Tiles: BT = min(C, 32), but 16 for float32 inputs with K or V above 64, whose 32-bit ``tl.dot``
    operands in 32-token tiles would need more shared memory than an A100 block has. The forward
    takes Dh in blocks of 32 columns. A GPU with less shared memory than the 32-token tiles need
    (``TILE_SHARED``, the sm_80 launch's needs; sm_86, sm_89 and sm_120 have 99 KB a block) takes
    16-token tiles. Float32 inputs with K or V above 64 do not fit such a GPU even then: the
    forward alone (no gradients) takes Dh in blocks of 16 there (``FP32_WIDE_SHARED``), and a
    call that needs the backward raises a ValueError naming the need and the GPU.

    The backward holds up to ten ``[BK|BV, BH]`` state and adjoint blocks per step, and its Dh
    block is the widest the GPU's shared memory takes among 16, 32, 64 where a wider block is
    leaner: on sm_90 and later, 64 for 16-bit inputs at K, V <= 64 and 32 at K, V <= 128
    (``WIDE_BWD_BLOCKS``); 16 everywhere else. On sm_90 the wider blocks issue fewer instructions
    and MMAs per token and spill less (with BH = 16, eight warps on a ``[32, 16]`` product tile
    compute half of it twice); on sm_80, BH = 32 spills more, not less, so it keeps 16.

    Warps: 8 for the chunk kernels, which spill fewer registers than with 4;
    ``benchmark_mlp_memory --launches`` times the alternatives on a GPU. Resource figures behind
    these choices: docs/kernels.md.
    """
    BT = 16 if dtype == torch.float32 and max(K, V) > 64 else min(chunk_size, 32)
    fwd_BH = min(32, max(16, triton.next_power_of_2(Dh)))
    if gpu is not None:
        key = (dtype == torch.float32, max(K, V) > 64)
        need = TILE_SHARED[key]
        if need.get(BT, 0) > gpu.shared_memory:
            BT = 16
        if kernels and need[BT] > gpu.shared_memory:
            if key != (True, True):
                raise shared_memory_error("an MLP-memory chunk kernel", K, V, dtype, chunk_size, need[BT],
                                          gpu.shared_memory, gpu.capability)
            for kernel in kernels:  # float32 above K = V = 64: only the forward fits, in narrow Dh blocks
                if FP32_WIDE_SHARED[kernel] > gpu.shared_memory:
                    name = "forward" if kernel == "fwd" else "backward"
                    fits = f"without gradients the forward alone needs {FP32_WIDE_SHARED['fwd'] >> 10} KB"
                    raise shared_memory_error(f"the MLP-memory chunk {name} kernel", K, V, dtype, chunk_size,
                                              FP32_WIDE_SHARED[kernel], gpu.shared_memory, gpu.capability,
                                              hint=fits if kernel == "bwd" else "")
            fwd_BH = 16
    bwd_BH = 16
    if gpu is not None and gpu.capability >= 90 and dtype != torch.float32:
        bwd_BH = next((bh for dim, bh, shared in WIDE_BWD_BLOCKS if max(K, V) <= dim and shared <= gpu.shared_memory),
                      16)
    launch = MLPLaunch(BT=BT, BK=max(16, triton.next_power_of_2(K)), BV=max(16, triton.next_power_of_2(V)),
                       fwd_BH=fwd_BH, bwd_BH=min(bwd_BH, max(16, triton.next_power_of_2(Dh))))
    if _LAUNCH_OVERRIDE:
        launch = replace(launch, **_LAUNCH_OVERRIDE)
        if launch.BT < 16 or chunk_size % launch.BT:
            launch = replace(launch, BT=min(chunk_size, 32))  # chunk sizes the override's tile cannot take
    return launch


def kernel_precision(launch: MLPLaunch, dtype: torch.dtype) -> str:
    """The chunk kernels' ``PRECISION`` under ``launch`` for inputs of ``dtype`` (emulated under
    Triton's interpreter: :func:`~titans_layers.ops.common.triton_utils.runnable_precision`)."""
    return runnable_precision(dot_precision(dtype, launch.lowp_dots))


@contextmanager
def override_mlp_launch(**fields):
    """Within the block, :func:`mlp_launch` returns its launch with ``fields`` replaced (e.g.
    ``fwd_warps=4, BT=16``): for comparing launch settings on a GPU (``benchmark_mlp_memory
    --launches``), not for production. A ``BT`` that is below 16 or does not divide the chunk
    size is ignored for that call."""
    unknown = set(fields) - set(MLPLaunch.__dataclass_fields__)
    if unknown:
        raise ValueError(f"override_mlp_launch: unknown fields {sorted(unknown)}; "
                         f"expected some of {sorted(MLPLaunch.__dataclass_fields__)}")
    saved = dict(_LAUNCH_OVERRIDE)
    _LAUNCH_OVERRIDE.update(fields)
    try:
        yield
    finally:
        _LAUNCH_OVERRIDE.clear()
        _LAUNCH_OVERRIDE.update(saved)


def _state_copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 copy the kernels may overwrite."""
    return x.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)


def chunk_fwd(q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens, plan: ChunkPlan,
              act: int, residual: bool, store_tiles: bool, max_norm: float | None = None):
    """Launch the forward kernel.

    Inputs: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, gates ``[B, T, H]`` (contiguous); the initial
    state W1, S1, A1 ``[N, H, K, Dh]``, W2, S2, A2 ``[N, H, Dh, V]`` (A: the current anchor);
    ``max_norm``: the update-clipping bound or None.
    Returns o ``[B, T, H, V]``, the final ``(W1, W2, S1, S2, A1, A2)`` (float32; A is the last
    chunk's anchor), when ``store_tiles`` the tile-start states ``(W1, S1, W2, S2)`` with a
    leading dim of ``plan.n_tiles`` (else None), and with clipping each token's write norm
    ``[B, T, H]`` float32 (else None).
    """
    s = plan.shape
    Dh = W1.shape[-1]
    kernels = ("fwd", "bwd") if store_tiles else ("fwd",)  # the tiles are stored for the backward
    launch = mlp_launch(plan.chunk_size, s.K, s.V, Dh, q.dtype, gpu_of(q), kernels)
    o = torch.empty_like(v)
    W1T, W2T, S1T, S2T, A1T, A2T = (_state_copy(x) for x in (W1, W2, S1, S2, A1, A2))
    if store_tiles:
        tiles = (q.new_empty(plan.n_tiles, s.H, s.K, Dh, dtype=torch.float32),
                 q.new_empty(plan.n_tiles, s.H, s.K, Dh, dtype=torch.float32),
                 q.new_empty(plan.n_tiles, s.H, Dh, s.V, dtype=torch.float32),
                 q.new_empty(plan.n_tiles, s.H, Dh, s.V, dtype=torch.float32))
    else:
        tiles = (W1T, W1T, W2T, W2T)  # never written
    clip = max_norm is not None
    norms = theta.new_empty(theta.shape, dtype=torch.float32) if clip else None  # [B, T, H]
    cu, is_varlen = varlen_args(cu_seqlens, plan.tile_indptr)
    if s.N * s.H > 0:
        with explained_launch("the MLP-memory chunk forward kernel", q, s.K, s.V, plan.chunk_size):
            chunk_mlp_memory_fwd_kernel[(s.N * s.H,)](
                q, k, v, alpha, eta, theta, offset, cu, plan.tile_indptr, o, W1T, S1T, A1T, W2T, S2T, A2T, *tiles,
                norms if clip else W1T, s.T, max_norm if clip else 0.0, H=s.H, K=s.K, V=s.V, Dh=Dh, C=plan.chunk_size,
                BT=plan.tile_size, BK=launch.BK, BV=launch.BV, BH=launch.fwd_BH, ACT=act, RESIDUAL=residual,
                IS_VARLEN=is_varlen, STORE_TILES=store_tiles, CLIP=clip, PRECISION=kernel_precision(launch, q.dtype),
                num_warps=launch.fwd_warps, num_stages=1)
    return o, (W1T, W2T, S1T, S2T, A1T, A2T), (tiles if store_tiles else None), norms


def chunk_bwd(q, k, v, alpha, eta, theta, A1, A2, offset, cu_seqlens, plan: ChunkPlan, tiles, do,
              dW1T, dW2T, dS1T, dS2T, dA1T, dA2T, act: int, residual: bool, norms=None,
              max_norm: float | None = None):
    """Launch the backward kernel.

    ``A1, A2``: the initial anchors; ``tiles``: the forward's tile-start states; ``do`` ``[B, T, H, V]``
    and the gradients of the final ``(W1, W2, S1, S2, A1, A2)`` (None: zero); with clipping, the
    forward's write ``norms`` ``[B, T, H]`` and its bound ``max_norm``. Returns the gradients
    of q, k, v, alpha, eta, theta (their dtypes) and of the initial ``(W1, W2, S1, S2, A1, A2)``
    (float32, ``[N, H, K, Dh]`` / ``[N, H, Dh, V]``).
    """
    s = plan.shape
    Dh = A1.shape[-1]
    launch = mlp_launch(plan.chunk_size, s.K, s.V, Dh, q.dtype, gpu_of(q), ("bwd",))
    adj = lambda g, like: torch.zeros(like.shape, dtype=torch.float32, device=like.device) if g is None \
        else _state_copy(g)
    dW1, dS1, dA1 = adj(dW1T, A1), adj(dS1T, A1), adj(dA1T, A1)
    dW2, dS2, dA2 = adj(dW2T, A2), adj(dS2T, A2), adj(dA2T, A2)
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dalpha, deta, dtheta = torch.empty_like(alpha), torch.empty_like(eta), torch.empty_like(theta)
    clip = max_norm is not None
    # each program's pass B hands pass C five [BT, Dh] float32 slots per tile (written before read)
    handoff = torch.empty(s.N * s.H, 5, plan.tile_size, Dh, dtype=torch.float32, device=q.device)
    cu, is_varlen = varlen_args(cu_seqlens, plan.tile_indptr)
    if s.N * s.H > 0:
        with explained_launch("the MLP-memory chunk backward kernel", q, s.K, s.V, plan.chunk_size):
            chunk_mlp_memory_bwd_kernel[(s.N * s.H,)](
                q, k, v, alpha, eta, theta, offset, cu, plan.tile_indptr, A1, A2, *tiles, do,
                dW1, dS1, dA1, dW2, dS2, dA2, dq, dk, dv, dalpha, deta, dtheta, norms if clip else dW1, handoff,
                s.T, max_norm if clip else 0.0, H=s.H, K=s.K, V=s.V, Dh=Dh, C=plan.chunk_size, BT=plan.tile_size,
                BK=launch.BK, BV=launch.BV, BH=launch.bwd_BH, ACT=act, RESIDUAL=residual, IS_VARLEN=is_varlen,
                CLIP=clip, PRECISION=kernel_precision(launch, q.dtype), num_warps=launch.bwd_warps, num_stages=1)
    return dq, dk, dv, dalpha, deta, dtheta, dW1, dW2, dS1, dS2, dA1, dA2


class ChunkMLPMemoryFunction(torch.autograd.Function):
    """Forward and backward through the Triton chunk kernels; the backward recomputes each tile
    from the tile-start states the forward stored (only when ``store``: a gradient is needed,
    :func:`~titans_layers.ops.common.grad_mode.needs_grad`)."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens, plan, act, residual,
                max_norm, store):
        o, final, tiles, norms = chunk_fwd(q, k, v, alpha, eta, theta, W1, W2, S1, S2, A1, A2, offset, cu_seqlens,
                                           plan, act, residual, store_tiles=store, max_norm=max_norm)
        if store:
            ctx.save_for_backward(q, k, v, alpha, eta, theta, A1, A2, offset, cu_seqlens, norms, *tiles)
            ctx.plan, ctx.act, ctx.residual, ctx.max_norm = plan, act, residual, max_norm
        return (o, *final)

    @staticmethod
    def backward(ctx, do, dW1T, dW2T, dS1T, dS2T, dA1T, dA2T):
        q, k, v, alpha, eta, theta, A1, A2, offset, cu_seqlens, norms, *tiles = ctx.saved_tensors
        grads = chunk_bwd(q, k, v, alpha, eta, theta, A1, A2, offset, cu_seqlens, ctx.plan, tiles, do,
                          dW1T, dW2T, dS1T, dS2T, dA1T, dA2T, ctx.act, ctx.residual, norms, ctx.max_norm)
        return (*grads, None, None, None, None, None, None, None)


def prepare_kernel_call(op_name, q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens, activation,
                        residual, max_update_norm, allowed_chunk_sizes, kernels):
    """Checks and state resolution shared by the Triton MLP-memory ops; ``kernels(needs_grad)``: the
    chunk kernels the call will launch (:func:`mlp_launch`), given whether a gradient is needed.

    Returns (contiguous inputs, initial ``(W1, W2, S1, S2, A1, A2)`` ``[N, H, ...]`` float32,
    offset ``[N]``, plan, activation code, whether a gradient is needed)."""
    shape = check_op_inputs(q, k, v, alpha, eta, theta, cu_seqlens)
    C = check_chunk_size(chunk_size, allowed_chunk_sizes)
    check_mlp_options(activation, residual, shape.K, shape.V)
    check_max_update_norm(max_update_norm)
    if q.dtype == torch.float64:
        raise TypeError(f"`{op_name}` takes float32, bfloat16 or float16 inputs; use the naive_* ops for float64")
    check_head_dims(shape.K, shape.V)
    init = resolve_mlp_state(initial_state, shape, C, q.device)
    check_triton_device(op_name, q)
    inputs = tuple(x.contiguous() for x in (q, k, v, alpha, eta, theta))
    states = tuple(x.contiguous() for x in (init.W1, init.W2, init.S1, init.S2, init.anchor1, init.anchor2))
    grad = needs_grad(*inputs, *states)
    tile = mlp_launch(C, shape.K, shape.V, init.W1.shape[-1], q.dtype, gpu_of(q), kernels(grad)).BT
    plan = make_plan(shape, C, init.offsets, cu_seqlens, q.device, tile=tile)
    return inputs, states, init.offset, plan, ACTIVATIONS.index(activation), grad


def pack_final_state(W1, W2, S1, S2, A1, A2, plan: ChunkPlan) -> MLPMemoryState:
    """The kernels' final buffers as an :class:`MLPMemoryState` (anchor = weights on a chunk boundary)."""
    offset = torch.tensor(plan.final_offsets, dtype=torch.long, device=W1.device)
    mid = (offset != 0).view(-1, 1, 1, 1)
    return MLPMemoryState(W1=W1, W2=W2, S1=S1, S2=S2, anchor1=torch.where(mid, A1, W1),
                          anchor2=torch.where(mid, A2, W2), offset=offset, chunk_size=plan.chunk_size)


@traceable("mlp_memory", "chunk")
def chunk_mlp_memory(q, k, v, alpha, eta, theta, *, chunk_size: int = 16, initial_state=None,
                     output_final_state: bool = False, cu_seqlens=None, activation: str = "silu",
                     residual: bool = False,
                     max_update_norm: float | None = None):
    """MLP-memory update (``f(x) = act(x W1) W2``, ``+ x`` with ``residual``) with Triton chunkwise
    kernels, differentiable.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32, bfloat16 or float16; K, V <= 128).
        alpha, eta, theta: ``[B, T, H]`` forget gate, momentum decay, step size.
        chunk_size: 16, 32 or 64.
        initial_state: required; ``(W1, W2)``, ``(W1, W2, S1, S2)`` or an :class:`MLPMemoryState`,
            W1 ``[N or 1, H, K, Dh]``, W2 ``[N or 1, H, Dh, V]`` (any Dh); receives gradients
            (summed over N for a leading dim of 1).
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (B == 1), or None.
        activation: "silu" or "gelu" (exact). residual: add the input to the memory's output (K == V).
        max_update_norm: None, or a bound on each token's write (``ops/common/clipping.py``); the
            kernels then take one more pass over the hidden units per tile for the write norms.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state a float32
        :class:`MLPMemoryState` or None. Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
    """
    inputs, states, offset, plan, act, grad = prepare_kernel_call(
        "chunk_mlp_memory", q, k, v, alpha, eta, theta, chunk_size, initial_state, cu_seqlens, activation, residual,
        max_update_norm, KERNEL_CHUNK_SIZES, lambda grad: ("fwd", "bwd") if grad else ("fwd",))
    o, *final = ChunkMLPMemoryFunction.apply(*inputs, *states, offset, cu_seqlens, plan, act, residual,
                                             check_max_update_norm(max_update_norm), grad)
    return o, (pack_final_state(*final, plan) if output_final_state else None)
