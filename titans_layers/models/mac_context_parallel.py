"""MAC under context parallelism: exact at any slice edge, inside a segment or a chunk included.

A MAC block's memory state at a slice edge depends on the slice before it non-linearly (the
retrieval feeds the attention, whose output is what the memory writes), so no affine map carries it
across ranks: the MAC mixer is chained in sequence. Rank r receives from rank r - 1 the decoding
state of the sequence crossing its left edge, the same state cached decoding carries
(:class:`~titans_layers.models.mac.MACState`: the weights at the segment start, the segment's
retrieved tokens, the retrieval queries' convolution history; the memory's state and convolution
history; the attention's keys and values of the segment so far), runs the mixer's general path
over its slice with that state as the first sequence's cache, and hands its own on. Gradients come
back the same way (:func:`~titans_layers.distributed.receive_state`,
:func:`~titans_layers.distributed.hand_on_state`), parameters through ordinary autograd. The MAC
mixers of a model therefore run one rank after another (the rest of the block, the MLP and the
other block kinds, runs in parallel). Communication per rank per MAC layer: one state, about
``(2 or 6) H K Dh + S D + 2 (S - 1) H d + 4 (conv - 1) H K`` floats, and its gradient.
"""

from __future__ import annotations

import torch

from titans_layers.distributed import CPContext, hand_on_state, receive_state
from titans_layers.models.mac import LayerStates, MACState
from titans_layers.modules.sliding_window_attention import WindowKVCache
from titans_layers.ops import MLPMemoryState, MomentumDeltaRuleState


def _fresh(mixer, N: int, like: torch.Tensor) -> LayerStates:
    """The cache of N sequences that begin here: what the general path starts from without a cache."""
    mem, att = mixer.memory, mixer.attention
    D, S = mixer.hidden_size, mixer.segment_size
    learned = mixer.num_retrieval_queries > 0
    State = MomentumDeltaRuleState if mem.memory == "linear" else MLPMemoryState
    init = [w.expand(N, *w.shape[1:]) for w in mem.initial_state()]  # (M,) or (W1, W2), [N, H, ...]
    # the state's field order: weights, momenta (zero), anchors (the weights)
    order = list(init) + [torch.zeros_like(w) for w in init] + list(init)
    offset = torch.zeros(N, dtype=torch.long, device=like.device)
    work = LayerStates()
    conv_width = mem.q_conv.kernel_size - 1 if mem.use_short_conv else 0
    inner = mem.num_heads * mem.head_dim
    zeros_conv = lambda: like.new_zeros(N, conv_width, inner)  # noqa: E731
    work.update(layer_idx=mem.layer_idx, recurrent_state=State(*order, offset=offset, chunk_size=mem.chunk_size),
                conv_state=(zeros_conv(), zeros_conv(), zeros_conv()) if mem.use_short_conv else None)
    hk, d = att.num_kv_heads, att.head_dim
    work.update(layer_idx=att.layer_idx, recurrent_state=WindowKVCache(
        k=like.new_zeros(N, S - 1, hk, d), v=like.new_zeros(N, S - 1, hk, d), seen=offset.clone()))
    slots = mixer.num_retrieval_queries if learned else S
    work.update(layer_idx=mixer.layer_idx, recurrent_state=MACState(
        start_weights=None if learned else tuple(w.clone() for w in init), retrieved=like.new_zeros(N, slots, D),
        phase=offset.clone(), conv_state=None if learned or not mem.use_short_conv else zeros_conv()))
    return work


def _float_fields(mixer, work: LayerStates) -> list[torch.Tensor]:
    """The float tensors of a cache, in a fixed order (all rows)."""
    mac = work[mixer.layer_idx]["recurrent_state"]
    mem = work[mixer.memory.layer_idx]
    att = work[mixer.attention.layer_idx]["recurrent_state"]
    out = list(mac.start_weights or ()) + [mac.retrieved] + ([mac.conv_state] if mac.conv_state is not None else [])
    state = mem["recurrent_state"]
    out += [t for t in state if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out += list(mem["conv_state"] or ())
    return out + [att.k, att.v]


def _seed_first_row(mixer, work: LayerStates, row0: list[torch.Tensor], phase: int, chunk_phase: int) -> None:
    """Put the received state in the first row of ``work`` (the sequence that continues)."""
    it = iter(row0)
    cat = lambda r, full: torch.cat([r.to(full.dtype), full[1:]])  # noqa: E731
    entry = work[mixer.layer_idx]
    mac: MACState = entry["recurrent_state"]
    start = None if mac.start_weights is None else tuple(cat(next(it), w) for w in mac.start_weights)
    retrieved = cat(next(it), mac.retrieved)
    conv = None if mac.conv_state is None else cat(next(it), mac.conv_state)
    phases = mac.phase.clone()
    phases[0] = phase
    entry["recurrent_state"] = MACState(start_weights=start, retrieved=retrieved, phase=phases, conv_state=conv)
    mem = work[mixer.memory.layer_idx]
    state = mem["recurrent_state"]
    fields = [f for f in state._fields if f not in ("offset", "chunk_size")]
    offset = state.offset.clone()
    offset[0] = chunk_phase
    mem["recurrent_state"] = state._replace(offset=offset, **{f: cat(next(it), getattr(state, f)) for f in fields})
    if mem["conv_state"] is not None:
        mem["conv_state"] = tuple(cat(next(it), c) for c in mem["conv_state"])
    att = work[mixer.attention.layer_idx]
    kv: WindowKVCache = att["recurrent_state"]
    seen = kv.seen.clone()
    seen[0] = phase
    att["recurrent_state"] = WindowKVCache(k=cat(next(it), kv.k), v=cat(next(it), kv.v), seen=seen)


def mac_forward_cp(mixer, hidden_states: torch.Tensor, cp: CPContext) -> torch.Tensor:
    """The MAC mixer on this rank's slice ``[1, n, D]`` -> ``[1, n, D]`` (see the module docstring)."""
    N = cp.num_local_sequences
    work = _fresh(mixer, N, hidden_states)
    templates = [t[:1].detach() for t in _float_fields(mixer, work)]
    # the same on every rank (the parameters are replicated), as the chain needs
    needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or
                                              any(p.requires_grad for p in mixer.parameters()))
    row0 = receive_state(cp, templates, needs_grad)
    if row0 is not None:
        S, C = mixer.segment_size, mixer.memory.chunk_size
        _seed_first_row(mixer, work, row0, cp.left_offset % S, cp.left_offset % C)
    o, _, _ = mixer.forward(hidden_states, past_key_values=work, use_cache=True, cu_seqlens=cp.cu_seqlens.to(
        hidden_states.device))
    outgoing = [t[-1:] for t in _float_fields(mixer, work)]
    return hand_on_state(o, cp, outgoing, needs_grad)
