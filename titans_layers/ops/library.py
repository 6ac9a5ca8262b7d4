"""The memory-update ops as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)``
traces through them.

The ops read host-side facts (sequence lengths, chunk offsets) and launch Triton kernels, which
Dynamo cannot trace. Under ``torch.compile`` every public ``naive_chunk_*``, ``chunk_*`` and
``fused_recurrent_*`` op therefore calls :func:`traceable_update`, which hands the whole update to
one opaque custom op, ``titans_layers::memory_update``, with a fake (meta) implementation that
gives the output shapes. Eager calls never come here: they run the op directly.

Gradients: the backward custom op, ``titans_layers::memory_update_backward``, re-runs the
forward with autograd and differentiates it (``naive_chunk``: autograd; ``chunk`` and
``fused_recurrent``: their Triton backward kernels). So a compiled training step pays one extra
forward of the memory update compared with eager mode, in exchange for a graph with no breaks.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from titans_layers.ops.mlp_memory.state import MLPMemoryState
from titans_layers.ops.momentum_delta_rule.state import MomentumDeltaRuleState

# family -> (state class, weight fields in order)
FAMILIES = {
    "momentum_delta_rule": (MomentumDeltaRuleState, ("M", "S", "anchor")),
    "mlp_memory": (MLPMemoryState, ("W1", "W2", "S1", "S2", "anchor1", "anchor2")),
}
N_INPUTS = 6  # q, k, v, alpha, eta, theta


def _op(family: str, impl: str):
    import titans_layers.ops as ops
    return getattr(ops, f"{impl}_{family}")


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _num_sequences(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _full_state(family: str, initial_state, q, v, N: int, chunk_size: int):
    """``initial_state`` in any accepted form -> (weights in field order, offset [N], its chunk size).
    Weights keep a leading dim of 1 where given (the op broadcasts them and sums their gradients)."""
    cls, fields = FAMILIES[family]
    if isinstance(initial_state, cls):
        return [getattr(initial_state, f) for f in fields], initial_state.offset, initial_state.chunk_size
    offset = torch.zeros(N, dtype=torch.long, device=q.device)
    if family == "momentum_delta_rule":
        if initial_state is None:
            M = torch.zeros(1, q.shape[2], q.shape[3], v.shape[3], dtype=_state_dtype(q), device=q.device)
            return [M, torch.zeros_like(M), M], offset, chunk_size
        if isinstance(initial_state, (tuple, list)) and len(initial_state) in (1, 2):
            M = initial_state[0]
            S = initial_state[1] if len(initial_state) == 2 else torch.zeros_like(M)
            return [M, S, M], offset, chunk_size
    elif isinstance(initial_state, (tuple, list)) and len(initial_state) in (2, 4):
        W1, W2 = initial_state[0], initial_state[1]
        S1, S2 = (initial_state[2], initial_state[3]) if len(initial_state) == 4 else \
            (torch.zeros_like(W1), torch.zeros_like(W2))
        return [W1, W2, S1, S2, W1, W2], offset, chunk_size
    return None  # let the op itself raise its error


def _run(q, k, v, alpha, eta, theta, weights, offset, cu_seqlens, family, impl, chunk_size, state_chunk_size,
         activation, residual, max_update_norm):
    cls, _ = FAMILIES[family]
    extra = dict(activation=activation, residual=residual) if family == "mlp_memory" else {}
    if max_update_norm is not None:
        extra["max_update_norm"] = max_update_norm
    state = cls(*weights, offset, state_chunk_size)
    o, final = _op(family, impl)(q, k, v, alpha, eta, theta, chunk_size=chunk_size, initial_state=state,
                                 output_final_state=True, cu_seqlens=cu_seqlens, **extra)
    return [o, *final[:-1]]  # o, weights..., offset (chunk_size is known to the caller)


def _no_alias(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Custom ops may not return their inputs or one storage twice: copy where that happens."""
    seen = {x.untyped_storage().data_ptr() for x in inputs if x is not None and x.numel()}
    out = []
    for x in outputs:
        ptr = x.untyped_storage().data_ptr()
        if x.numel() and ptr in seen:
            x = x.clone()
        seen.add(x.untyped_storage().data_ptr())
        out.append(x)
    return out


def _autograd_dispatch_keys():
    outside = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._AutoDispatchBelowAutograd():
        return torch._C._dispatch_tls_local_exclude_set() - outside


_AUTOGRAD_KEYS = _autograd_dispatch_keys()


@contextlib.contextmanager
def _autograd_on():
    """Autograd inside a custom op's body, which the dispatcher runs below autograd (its autograd
    keys excluded): un-exclude them for the block. This is how the backward op re-runs the
    forward and differentiates it with each implementation's own backward (Triton kernels
    included), rather than with ``torch.func``, which hands ``autograd.Function`` backwards
    wrapped tensors that Triton cannot launch on."""
    include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS), torch.enable_grad():
        yield


@torch.library.custom_op("titans_layers::memory_update", mutates_args=())
def memory_update(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, eta: torch.Tensor,
                  theta: torch.Tensor, weights: list[torch.Tensor], offset: torch.Tensor,
                  cu_seqlens: Optional[torch.Tensor], family: str, impl: str, chunk_size: int,
                  state_chunk_size: int, activation: str, residual: bool,
                  max_update_norm: Optional[float]) -> list[torch.Tensor]:
    """One memory update as an opaque op: returns ``[o, *final weights, final offset]``."""
    outputs = _run(q, k, v, alpha, eta, theta, weights, offset, cu_seqlens, family, impl, chunk_size,
                   state_chunk_size, activation, residual, max_update_norm)
    outputs = [x.contiguous() for x in outputs]  # the fake implementation promises contiguous outputs
    return _no_alias(outputs, [q, k, v, alpha, eta, theta, *weights, offset, cu_seqlens])


@memory_update.register_fake
def _(q, k, v, alpha, eta, theta, weights, offset, cu_seqlens, family, impl, chunk_size, state_chunk_size,
      activation, residual, max_update_norm):
    N = _num_sequences(q, cu_seqlens)
    o = q.new_empty(*v.shape)  # [B, T, H, V] in q's dtype
    finals = [w.new_empty(N, *w.shape[1:], dtype=_state_dtype(q)) for w in weights]  # [N, H, ...]
    return [o, *finals, offset.new_empty(N)]


@torch.library.custom_op("titans_layers::memory_update_backward", mutates_args=())
def memory_update_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                           eta: torch.Tensor, theta: torch.Tensor, weights: list[torch.Tensor],
                           offset: torch.Tensor, cu_seqlens: Optional[torch.Tensor], family: str, impl: str,
                           chunk_size: int, state_chunk_size: int, activation: str, residual: bool,
                           max_update_norm: Optional[float], grad_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of :func:`memory_update`'s differentiable outputs (o and the final weights) with
    respect to q, k, v, alpha, eta, theta and the initial weights, by re-running it under autograd."""
    inputs = [x.detach().requires_grad_() for x in (q, k, v, alpha, eta, theta, *weights)]
    with _autograd_on():
        outputs = _run(*inputs[:N_INPUTS], inputs[N_INPUTS:], offset, cu_seqlens, family, impl, chunk_size,
                       state_chunk_size, activation, residual, max_update_norm)[:-1]  # o and the final weights
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g.contiguous() for g, x in zip(grads, inputs)]
    return _no_alias(grads, [q, k, v, alpha, eta, theta, *weights, *grad_outputs])


@memory_update_backward.register_fake
def _(q, k, v, alpha, eta, theta, weights, offset, cu_seqlens, family, impl, chunk_size, state_chunk_size,
      activation, residual, max_update_norm, grad_outputs):
    return [torch.empty_like(x) for x in (q, k, v, alpha, eta, theta, *weights)]


def _setup_context(ctx, inputs, output):
    q, k, v, alpha, eta, theta, weights, offset, cu_seqlens, *options = inputs
    ctx.save_for_backward(q, k, v, alpha, eta, theta, offset, *weights)
    ctx.cu_seqlens, ctx.options, ctx.n_weights = cu_seqlens, options, len(weights)


def _backward(ctx, grads):
    q, k, v, alpha, eta, theta, offset, *weights = ctx.saved_tensors
    N = _num_sequences(q, ctx.cu_seqlens)
    shapes = [(v.shape, q.dtype)] + [((N, *w.shape[1:]), _state_dtype(q)) for w in weights]
    # outputs nobody used (and the integer offset) get zero cotangents
    cotangents = [g if g is not None else torch.zeros(shape, dtype=dtype, device=q.device)
                  for g, (shape, dtype) in zip(grads, shapes)]
    dx = memory_update_backward(q, k, v, alpha, eta, theta, weights, offset, ctx.cu_seqlens, *ctx.options,
                                cotangents)
    return (*dx[:N_INPUTS], dx[N_INPUTS:], None, None, None, None, None, None, None, None, None)


memory_update.register_autograd(_backward, setup_context=_setup_context)


def traceable_update(family: str, impl: str, q, k, v, alpha, eta, theta, *, chunk_size: int = 16,
                     initial_state=None, output_final_state: bool = False, cu_seqlens=None,
                     activation: str = "silu", residual: bool = False, max_update_norm: float | None = None):
    """Run ``{impl}_{family}`` through the custom op (what the public ops do under ``torch.compile``).
    Same arguments and returns as the op."""
    full = _full_state(family, initial_state, q, v, _num_sequences(q, cu_seqlens), chunk_size)
    if full is None:  # malformed: the eager op raises the documented error
        extra = dict(activation=activation, residual=residual) if family == "mlp_memory" else {}
        if max_update_norm is not None:
            extra["max_update_norm"] = max_update_norm
        return _op(family, impl)(q, k, v, alpha, eta, theta, chunk_size=chunk_size, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens, **extra)
    weights, offset, state_chunk_size = full
    o, *finals, final_offset = memory_update(q, k, v, alpha, eta, theta, list(weights), offset, cu_seqlens, family,
                                             impl, chunk_size, state_chunk_size, activation, residual,
                                             max_update_norm)
    if not output_final_state:
        return o, None
    cls, _ = FAMILIES[family]
    return o, cls(*finals, final_offset, chunk_size)
