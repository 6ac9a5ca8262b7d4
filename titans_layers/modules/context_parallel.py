"""The layers under context parallelism (``cp_context=`` in their forward).

Each rank holds a contiguous slice of one packed batch (:class:`~titans_layers.distributed.CPContext`).
What crosses a slice edge:

- the short convolution of :class:`NeuralMemory` reads the ``conv_size - 1`` inputs before the slice:
  the layer input of those tokens comes from the preceding rank(s)
  (:func:`~titans_layers.distributed.left_halo`, gradients sent back) and is projected here, as
  the convolution cache of the first sequence;
- the memory state: :func:`~titans_layers.distributed.context_parallel_update` (parallel state
  passing for the linear memory, in sequence for the MLP memory, or head parallel);
- :class:`SlidingWindowAttention` reads the ``window - 1`` keys and values before the slice: their
  layer input comes as a halo, and the keys are rotated at their true positions in the sequence.

Nothing else is exchanged: projections, gates, norms and persistent tokens are per token or
replicated parameters (their gradients are per-rank partial sums, summed by DDP / FSDP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titans_layers.distributed import CPContext, check_context, context_parallel_update, left_halo
from titans_layers.distributed.halo import right_aligned
from titans_layers.modules.short_conv import sequence_starts


def check_cp_call(name: str, cp_context, hidden_states, attention_mask, past_key_values, use_cache,
                  kwargs) -> CPContext:
    """The context, after checking that the call is one a context-parallel layer takes: this rank's
    slice ``[1, n, D]``, no padding mask, no ``cu_seqlens`` (the context holds the sequences), no cache."""
    cp = check_context(cp_context)
    if attention_mask is not None or kwargs.get("cu_seqlens") is not None:
        raise ValueError(f"{name} under context parallelism takes packed input described by `cp_context`: "
                         "pass neither `attention_mask` nor `cu_seqlens`")
    if past_key_values is not None or use_cache:
        raise ValueError(f"{name} under context parallelism runs without a cache (training or a whole-sequence "
                         "forward): pass no `past_key_values` and use_cache=False")
    cp.check_local("hidden_states", hidden_states)
    return cp


def conv_cache(halo_inputs: torch.Tensor, n_sequences: int, width: int) -> torch.Tensor:
    """A short-convolution cache ``[n_sequences, width, C]`` whose first row holds the halo's
    inputs ``[h, C]`` (right-aligned, zeros before the sequence start) and whose other rows are zero
    (sequences that begin in this slice)."""
    first = right_aligned(halo_inputs, width)[None]  # [1, width, C]
    return torch.cat([first, first.new_zeros(n_sequences - 1, width, first.shape[-1])])


def memory_forward_cp(layer, hidden_states: torch.Tensor, cp: CPContext, mode: str = "auto"):
    """:class:`~titans_layers.modules.NeuralMemory`'s forward on this rank's slice ``[1, n, D]``
    -> ``[1, n, D]`` (equal to the whole batch's forward in one process, sliced)."""
    layer._check_hidden_states(hidden_states)
    x = hidden_states
    H, Dk = layer.num_heads, layer.head_dim
    N = cp.num_local_sequences
    cu = cp.cu_seqlens.to(x.device)
    halo = None
    if layer.use_short_conv:
        width = layer.q_conv.kernel_size - 1
        halo = left_halo(x, cp, width)  # [h, D] the layer input before this slice

    def project(proj, conv):  # [1, n, H * K]
        y = proj(x)
        if not layer.use_short_conv:
            return F.silu(y)
        cache = conv_cache(proj(halo), N, conv.kernel_size - 1)
        return conv(y, cache=cache, cu_seqlens=cu)[0]

    q = F.normalize(project(layer.q_proj, getattr(layer, "q_conv", None)).unflatten(-1, (H, Dk)), dim=-1)
    k = F.normalize(project(layer.k_proj, getattr(layer, "k_conv", None)).unflatten(-1, (H, Dk)), dim=-1)
    v = project(layer.v_proj, getattr(layer, "v_conv", None)).unflatten(-1, (H, Dk))  # [1, n, H, V]
    alpha = torch.sigmoid(layer.alpha_proj(x).float())  # [1, n, H]
    eta = torch.sigmoid(layer.eta_proj(x).float())
    theta = layer.max_step_size * torch.sigmoid(layer.theta_proj(x).float())
    op = layer._memory_op(x.device, cp.total_length)
    extra = dict(activation=layer.activation, residual=layer.mlp_residual) if layer.memory == "mlp" else {}
    if layer.max_update_norm is not None:
        extra["max_update_norm"] = layer.max_update_norm
    o, _ = context_parallel_update(op, q, k, v, alpha.to(q.dtype), eta.to(q.dtype), theta.to(q.dtype), cp_context=cp,
                                   mode=mode, chunk_size=layer.chunk_size, initial_state=layer.initial_state(),
                                   **extra)
    return layer._output(o, x)


def attention_forward_cp(layer, hidden_states: torch.Tensor, cp: CPContext, prefix_states=None, prefix_positions=None):
    """:class:`~titans_layers.modules.SlidingWindowAttention`'s forward on this rank's slice
    ``[1, n, D]`` -> ``[1, n, D]``: the first sequence's window reaches back into the preceding
    ranks through the halo (its keys and values, rotated at their positions in the sequence)."""
    from titans_layers.modules.sliding_window_attention import WindowKVCache, rotary

    x = hidden_states
    W, Hq, Hk, d = layer.window_size, layer.num_heads, layer.num_kv_heads, layer.head_dim
    N = cp.num_local_sequences
    cu = cp.cu_seqlens.to(device=x.device, dtype=torch.long)
    halo = left_halo(x, cp, W - 1)  # [h, D]
    h = halo.shape[0]
    halo_pos = torch.arange(cp.left_offset - h, cp.left_offset, device=x.device)
    k_halo = rotary(layer._heads(halo, layer.k_proj, Hk), halo_pos, layer.rope_base)  # [h, Hk, d]
    v_halo = layer._heads(halo, layer.v_proj, Hk)
    k_cache = torch.cat([right_aligned(k_halo, W - 1)[None], k_halo.new_zeros(N - 1, W - 1, Hk, d)])
    v_cache = torch.cat([right_aligned(v_halo, W - 1)[None], v_halo.new_zeros(N - 1, W - 1, Hk, d)])
    seen = torch.zeros(N, dtype=torch.long, device=x.device)
    seen[0] = cp.left_offset
    cache = WindowKVCache(k=k_cache, v=v_cache, seen=seen)

    flat = x[0]  # [n, D]
    n = flat.shape[0]
    seq, pos = sequence_starts(cu, n)
    lens = cu[1:] - cu[:-1]  # [N]
    L = int(lens.max().item())
    qh = rotary(layer._heads(flat, layer.q_proj, Hq), seen[seq] + pos, layer.rope_base)  # [n, Hq, d]
    kh = rotary(layer._heads(flat, layer.k_proj, Hk), seen[seq] + pos, layer.rope_base)  # [n, Hk, d]
    vh = layer._heads(flat, layer.v_proj, Hk)

    def padded(t):  # [n, ...] -> [N, L, ...]
        out = t.new_zeros(N, L, *t.shape[1:])
        out[seq, pos] = t
        return out

    out = layer._attend_sdpa(padded(qh), padded(kh), padded(vh), cache, lens, L, prefix_states,
                             prefix_positions)[seq, pos]  # [n, Hq, d]
    return layer.o_proj(out.flatten(-2))[None]  # [1, n, D]
