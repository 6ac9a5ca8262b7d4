"""The MAC (memory as context) token mixer and its decoding state.

Per sequence, the tokens are cut into segments of ``S = segment_size`` (the first segment starts at
the sequence's first token). For segment s with tokens x (SPEC §3):

1. **retrieve**: ``h_i = f(q_i; W_s)`` with the memory's queries of the segment's tokens and the
   memory weights ``W_s`` as they stood at the segment start; nothing is written;
2. **attend**: softmax attention of the segment's tokens over ``[persistent || h || x]``: the
   persistent tokens are visible to every position, retrieved token i to position j only when
   i <= j, and the segment's own tokens causally (the attention never looks outside the segment);
3. **write**: the residual stream after the attention, ``x + y``, goes into the memory with the
   per-token update (the memory layer's forward continues the state, so position j reads only
   writes from positions <= j); its read ``m_j = f(x_j + y_j; W_j)`` comes back. The paper writes
   y alone; with y alone the memory's keys and values are attention mixtures of the segment, which
   at initialisation are near-uniform averages that carry no token's identity, and a small MAC
   did not learn associative recall that LMM learns (measured in ``docs/experiments.md``);
4. **gate**: ``o = MemoryGate(y, m) = norm(y) * act(norm(m))``.

Learned retrieval queries (``config.num_retrieval_queries = R > 0``, SPEC §3's option). Step 1
reads the memory with R learned queries instead of the segment's own: ``h_r = f(q_r; W_s)``,
r = 1..R, the same R queries for every segment and sequence. These R retrieved tokens depend only on
the memory before the segment, so every position of the segment sees all of them (like the
persistent tokens): the attention runs over ``[persistent || h_1..h_R || x]``. Steps 3 and 4 are
unchanged. The queries are R learned tokens ``[R, D]`` in the model's hidden space, read through the
memory's query path (:meth:`~titans_layers.modules.NeuralMemory.query_tokens`: q projection, SiLU,
L2 norm, no short convolution since they are not a sequence) and its output path (per-head norm,
output gate, ``o_proj``) like any token, see :class:`MACMixer`.

How it runs. The memory state at every segment start is needed before the segment can attend,
so the mixer loops over segments in Python (``ceil(T / S)`` steps per call), continuing the
memory state from one step to the next. Two paths:

- **whole sequences** (no cache, no padding, no packing: training and plain forwards): segment k
  is ``x[:, kS:(k+1)S]`` for every row; the attention is a fresh call per segment and the memory
  state passes between segments in a private :class:`LayerStates`. Static shapes, no host syncs
  of its own.
- **general** (a cache, a padding mask or packed ``cu_seqlens``): every step runs on packed
  tokens (one row per sequence) and each sequence may be at its own place in its segment (left
  padding, a prefill that stops mid-segment). The sublayers keep their state in fla's ``Cache``
  (or a private :class:`LayerStates`) between steps:

- the memory (a :class:`~titans_layers.modules.NeuralMemory`, its own cache index) holds the
  current weights and the convolution state of the stream it writes (y);
- the attention (a :class:`~titans_layers.modules.SlidingWindowAttention` with window S, its own
  cache index) holds the current segment's keys and values; a row that begins a segment has its
  window restarted (``seen = 0``: earlier keys are masked, rotary positions restart), which is
  what a fresh per-segment attention would see;
- :class:`MACState` (the mixer's own cache index) holds the weights at the current segment's
  start, the segment's retrieved tokens so far, how far into its segment each sequence is, and
  the convolution state of the retrieval queries (they read the block input x, another stream).
  With learned retrieval queries it holds the segment's R retrieved tokens instead, read once
  when the sequence begins the segment (neither the start weights nor a convolution state are
  needed then).

The two paths compute the same thing; the tests hold cached decoding and packed input (general
path) to the whole-sequence forward.

Cost: the retrieval of a decoded token reads one slot, but its attention re-projects the
segment's S retrieved tokens as keys and values (O(S D^2) per token and layer). With R learned
queries a decoded token reads nothing (the R tokens are read once per segment) and its attention
re-projects R retrieved tokens (O(R D^2)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache

from titans_layers.models.builders import make_attention, make_memory, make_persistent
from titans_layers.models.configuration_titans import TitansConfig
from titans_layers.modules import MemoryGate
from titans_layers.modules.checks import check_hidden_states, check_padding, resolve_cache
from titans_layers.modules.context_parallel import check_cp_call
from titans_layers.modules.short_conv import sequence_starts


class LayerStates:
    """A minimal stand-in for fla's ``Cache`` that a mixer keeps to itself: what fla's layer helpers
    call (``len``, ``[idx]`` -> the layer's state dict or None, ``update(layer_idx=..., **states)``)
    and nothing else, so it stays cheap and traceable by ``torch.compile``."""

    def __init__(self):
        self.states: dict[int, dict] = {}

    def __len__(self) -> int:
        return max(self.states) + 1 if self.states else 0

    def __getitem__(self, layer_idx: int) -> dict | None:
        return self.states.get(layer_idx)

    def update(self, layer_idx: int, offset: int = 0, cache_kwargs=None, **states) -> dict:
        entry = self.states.setdefault(layer_idx, dict(recurrent_state=None, attn_state=None, conv_state=None,
                                                       ffn_state=None))
        entry.update({k: v for k, v in states.items() if v is not None})
        return entry


def read_only_states(past_key_values, layer_indices: list[int]) -> LayerStates:
    """A private :class:`LayerStates` seeded with the entries of ``layer_indices`` in
    ``past_key_values`` (fla's ``Cache``, or None): a sublayer reads the cached state from it and
    writes to it, and ``past_key_values`` is left untouched (a call with ``use_cache=False``)."""
    work = LayerStates()
    if past_key_values is not None:
        for idx in layer_indices:
            if len(past_key_values) > idx and past_key_values[idx] is not None:
                work.states[idx] = dict(past_key_values[idx])
    return work


@dataclass
class MACState:
    """MAC's own decoding state, one row per sequence (N rows).

    A dataclass (not a tuple) so that fla's cache keeps its type when it reorders or repeats rows.

    Per-token retrieval (``num_retrieval_queries = 0``): ``retrieved`` is ``[N, S, D]``, slot i the
    token read by in-segment position i (slots not reached yet are stale and never visible). With
    R learned retrieval queries: ``retrieved`` is ``[N, R, D]``, the segment's R tokens, read when
    the sequence began the segment; ``start_weights`` and ``conv_state`` are then None.
    """

    start_weights: tuple[torch.Tensor, ...] | None  # weights at the segment start: (M [N, H, K, V],) or (W1, W2)
    retrieved: torch.Tensor  # [N, S, D] (per-token retrieval) or [N, R, D] (learned queries)
    phase: torch.Tensor  # [N] int64, tokens of the current segment already seen, in [0, S)
    conv_state: torch.Tensor | None  # [N, conv_size - 1, H * K] short-conv cache of the retrieval queries


class MACMixer(nn.Module):
    """Memory as context (see the module docstring), with fla's layer interface.

    Args:
        config: the model config (``segment_size``, ``num_persistent_tokens``,
            ``num_retrieval_queries``, memory options).
        cache_indices: ``[state, memory, attention]`` indices in fla's ``Cache``; the first is this
            mixer's ``layer_idx`` and is updated with the call's length, so the cache's
            ``get_seq_length`` is right when MAC is the first block.

    ``forward(hidden_states [B, T, D], attention_mask=None, past_key_values=None, use_cache=False,
    output_attentions=False, cu_seqlens=None) -> (o [B, T, D], None, past_key_values)``; a 2-D
    ``attention_mask`` (0 = padding) or packed ``cu_seqlens`` (B = 1), not both, as in the layers.
    A call with a cache and ``use_cache=False`` reads the cache and leaves it untouched.
    ``cp_context=`` in kwargs: this rank's slice ``[1, n, D]`` of a batch split across ranks, the
    mixer chained rank to rank (:mod:`~titans_layers.models.mac_context_parallel`).

    With ``config.num_retrieval_queries = R > 0`` the mixer owns ``retrieval_queries`` ``[R, D]``,
    R learned tokens in the hidden space (not ``[R, H, K]`` in the memory's query space). Their
    queries go through the memory's q projection (without its short convolution: they are not a
    sequence), SiLU and L2 norm, and their reads through the memory's per-head norm, output gate
    and ``o_proj``, exactly like a token's: the memory's output gate needs the token a read belongs
    to, which a query-space vector would not have, and the learned queries stay in the span the
    memory's own queries come from as ``q_proj`` trains. Initialised ``N(0, 1)``: the mixer's input
    is RMS-normalised, so real tokens have that scale.
    """

    def __init__(self, config: TitansConfig, cache_indices: list[int]):
        super().__init__()
        self.layer_idx, memory_idx, attention_idx = cache_indices
        self.segment_size = config.segment_size
        self.hidden_size = config.hidden_size
        self.num_retrieval_queries = config.num_retrieval_queries
        self.memory = make_memory(config, memory_idx)
        if self.num_retrieval_queries:
            R = self.num_retrieval_queries
            self.retrieval_queries = nn.Parameter(torch.randn(R, config.hidden_size))  # [R, D]
        self.attention = make_attention(config, config.segment_size, attention_idx)
        self.persistent = make_persistent(config)
        self.gate = MemoryGate(config.hidden_size, config.gate_activation, config.norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values=None,
                use_cache: bool | None = False, output_attentions: bool | None = False, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        check_hidden_states(hidden_states, self.hidden_size, self.memory.q_proj.weight.dtype)
        cp_context = kwargs.pop("cp_context", None)
        if cp_context is not None:  # this rank's slice of a batch split across ranks: chained rank to rank
            from titans_layers.models.mac_context_parallel import mac_forward_cp
            cp = check_cp_call("MACMixer", cp_context, hidden_states, attention_mask, past_key_values, use_cache,
                               kwargs)
            return mac_forward_cp(self, hidden_states, cp), None, None
        check_padding(hidden_states, attention_mask, kwargs.get("cu_seqlens"))
        if past_key_values is None and attention_mask is None and kwargs.get("cu_seqlens") is None:
            return self._forward_whole(hidden_states), None, None
        B, T, D = hidden_states.shape
        S = self.segment_size
        x, indices, cu_seqlens = unpad_hidden_states(hidden_states, kwargs.get("cu_seqlens"), attention_mask, T)
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (B + 1) * T, T, device=x.device)
            x = x.reshape(1, B * T, D)
        xs = x[0]  # [n, D] packed tokens
        n, N = xs.shape[0], cu_seqlens.numel() - 1
        store = past_key_values is not None and bool(use_cache)
        work = past_key_values if store else read_only_states(
            past_key_values, [self.layer_idx, self.memory.layer_idx, self.attention.layer_idx])

        entry = get_layer_cache(self, work)
        state: MACState | None = entry["recurrent_state"] if entry is not None else None
        learned = self.num_retrieval_queries > 0
        if state is None:
            phase0 = torch.zeros(N, dtype=torch.long, device=x.device)
            slots = self.num_retrieval_queries if learned else S
            start, retrieved, conv = None, xs.new_zeros(N, slots, D), None  # retrieved [N, R or S, D]
        else:
            if state.phase.shape != (N,):
                raise ValueError(f"the cached MAC state has {state.phase.shape[0]} sequences, this call has {N}")
            phase0, start, retrieved, conv = state.phase, state.start_weights, state.retrieved, state.conv_state
        if not learned:  # the segment's own retrieval queries
            q, conv = self.memory.query(x, conv_state=conv, output_conv_state=store,
                                        cu_seqlens=cu_seqlens)  # [1, n, H, K]

        seq, pos = sequence_starts(cu_seqlens, n)  # [n]
        g = phase0[seq] + pos  # index of each token counted from its sequence's current segment start
        step, slot = g // S, g % S  # [n]: the step (segment) of this call it belongs to, its in-segment position
        n_steps = int(step.max()) + 1 if n else 0
        pieces, order = [], []
        for k in range(n_steps):
            idx = torch.nonzero(step == k).squeeze(1)  # [n_k] this step's tokens, by sequence then position
            rows, slots = seq[idx], slot[idx]
            lens = torch.bincount(rows, minlength=N)  # [N]
            cu_k = F.pad(lens.cumsum(0), (1, 0))  # [N + 1]
            first = phase0 if k == 0 else torch.zeros_like(phase0)  # [N] in-segment position of each first token
            begins = (lens > 0) & (first == 0)  # [N] sequences that start a segment in this step
            if learned:
                retrieved = self._retrieve_learned_at_starts(work, begins, retrieved)
            else:
                start = self._segment_start(work, start, begins, N)
                retrieved = self._retrieve(q[0, idx], xs[idx], rows, slots, start, retrieved)
            self._restart_attention(work, begins)
            prefix, positions = self._prefix(retrieved, first)
            y, _, _ = self.attention(xs[idx][None], past_key_values=work, use_cache=True, cu_seqlens=cu_k,
                                     prefix_states=prefix, prefix_positions=positions)  # [1, n_k, D]
            m, _, _ = self.memory(y + xs[idx][None], past_key_values=work, use_cache=True,
                                  cu_seqlens=cu_k)  # [1, n_k, D] writes the residual stream x + y
            pieces.append(self.gate(y, m)[0])
            order.append(idx)
        if n_steps:
            o = torch.cat(pieces)[torch.argsort(torch.cat(order))]  # [n, D] back in token order
        else:
            o = xs.new_zeros(0, D)

        if store and (state is not None or n_steps):
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [N]
            update_layer_cache(self, past_key_values, offset=T, recurrent_state=MACState(
                start_weights=start, retrieved=retrieved, phase=(phase0 + lengths) % S, conv_state=conv))
        o = repad_hidden_states(o[None], indices, B, T) if indices is not None else o.reshape(B, T, D)
        return o, None, past_key_values

    def _forward_whole(self, x: torch.Tensor) -> torch.Tensor:
        """The whole-sequence path: ``x`` ``[B, T, D]``, every row starting a sequence -> ``[B, T, D]``."""
        B, T, D = x.shape
        S = self.segment_size
        learned = self.num_retrieval_queries > 0
        q = None if learned else self.memory.query(x)[0]  # [B, T, H, K] the segments' own retrieval queries
        states = LayerStates()  # the memory's state between segments
        outs = []
        for s0 in range(0, T, S):
            xs = x[:, s0:s0 + S]  # [B, L, D]
            entry = states[self.memory.layer_idx]
            weights = self.memory.memory_weights(entry["recurrent_state"] if entry is not None else None)
            if learned:  # [B, R, D] read at the segment start (leading dim 1 while the memory is the initial one)
                h = self._learned_retrieval(weights).to(x.dtype).expand(B, -1, -1)
            else:  # [B, L, D] read at the segment start
                h = self.memory.retrieve(q[:, s0:s0 + S], xs, weights)
            prefix, positions = self._prefix(h)
            y, _, _ = self.attention(xs, prefix_states=prefix, prefix_positions=positions)  # [B, L, D]
            m, _, _ = self.memory(y + xs, past_key_values=states, use_cache=True)  # [B, L, D] writes x + y
            outs.append(self.gate(y, m))
        return torch.cat(outs, dim=1) if outs else x.new_zeros(B, 0, D)

    def _current_weights(self, work, N: int) -> tuple[torch.Tensor, ...]:
        """The memory's weights as they stand in ``work`` now, one row per sequence:
        ``(M [N, H, K, V],)`` or ``(W1 [N, H, K, Dh], W2 [N, H, Dh, V])``."""
        entry = get_layer_cache(self.memory, work)
        current = self.memory.memory_weights(entry["recurrent_state"] if entry is not None else None)
        return tuple(w.expand(N, *w.shape[1:]) for w in current)

    def _segment_start(self, work, start, begins: torch.Tensor, N: int) -> tuple[torch.Tensor, ...]:
        """Memory weights at each sequence's current segment start: the current weights for the
        sequences that begin a segment now, the cached ones for the others."""
        current = self._current_weights(work, N)  # [N, H, ...]
        if start is None:
            return current
        b = begins.view(N, 1, 1, 1)
        return tuple(torch.where(b, c, s) for c, s in zip(current, start))

    def _restart_attention(self, work, begins: torch.Tensor) -> None:
        """Restart the attention window of the sequences that begin a segment (earlier keys are
        masked out and rotary positions count from the segment start)."""
        entry = get_layer_cache(self.attention, work)
        kv = entry["recurrent_state"] if entry is not None else None
        if kv is not None:
            entry["recurrent_state"] = kv._replace(seen=torch.where(begins, torch.zeros_like(kv.seen), kv.seen))

    def _learned_retrieval(self, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Read the memory with the R learned queries: ``h_r = f(q_r; W)`` through the memory's output
        path. ``weights`` from ``memory_weights``, leading dim n (1 for the shared initial memory)
        -> ``[n, R, D]``."""
        n = weights[0].shape[0]
        u = self.retrieval_queries  # [R, D]
        q = self.memory.query_tokens(u)  # [R, H, K]
        return self.memory.retrieve(q.expand(n, *q.shape), u.expand(n, *u.shape), weights)  # [n, R, D]

    def _retrieve_learned_at_starts(self, work, begins: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        """Learned-query mode: read the R retrieved tokens of the sequences that begin a segment in
        this step from the memory as it stands now (their segment start); the other sequences keep
        the tokens read when they began theirs (nothing is read again mid-segment).

        begins ``[N]`` bool, retrieved ``[N, R, D]`` -> the updated ``[N, R, D]``."""
        N = retrieved.shape[0]
        rows = torch.nonzero(begins).squeeze(1)  # [n_b]
        if rows.numel() == 0:
            return retrieved
        weights = tuple(w[rows] for w in self._current_weights(work, N))  # [n_b, H, ...]
        h = self._learned_retrieval(weights)  # [n_b, R, D]
        return retrieved.index_put((rows,), h.to(retrieved.dtype))

    def _retrieve(self, q: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                  start: tuple[torch.Tensor, ...], retrieved: torch.Tensor) -> torch.Tensor:
        """Read the step's tokens from the segment-start weights and put them in their slots.

        q ``[n_k, H, K]``, x ``[n_k, D]`` (the step's tokens), rows / slots ``[n_k]`` (sequence and
        in-segment position of each), retrieved ``[N, S, D]`` -> the updated ``[N, S, D]``."""
        N, S, D = retrieved.shape
        lo, hi = int(slots.min()), int(slots.max()) + 1  # only the slot range this step touches
        qp = q.new_zeros(N, hi - lo, *q.shape[1:])  # [N, span, H, K]
        xp = x.new_zeros(N, hi - lo, D)  # [N, span, D]
        qp[rows, slots - lo] = q
        xp[rows, slots - lo] = x
        h = F.pad(self.memory.retrieve(qp, xp, start), (0, 0, lo, S - hi))  # [N, S, D]
        filled = torch.zeros(N, S, 1, dtype=torch.bool, device=x.device)
        filled[rows, slots] = True
        return torch.where(filled, h.to(retrieved.dtype), retrieved)

    def _prefix(self, retrieved: torch.Tensor, first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention prefix ``[N, N_p + S, D]`` = persistent then retrieved tokens, and when each
        is visible, counted from the call's first token of each sequence: always (-1) for
        persistent tokens, from its own in-segment position on for retrieved token i.

        ``first`` ``[N]``: in-segment position of each sequence's first token in the call; the
        positions are then ``[N, N_p + S]``. None: every sequence starts its segment, positions ``[N_p + S]``.

        Learned retrieval queries: retrieved is ``[N, R, D]``, the prefix ``[N, N_p + R, D]`` and
        every position ``[N_p + R]`` is -1 (the R tokens depend only on the past: all visible).
        """
        N, L, _ = retrieved.shape  # L = S retrieved tokens, or R with learned queries
        if self.num_retrieval_queries:
            positions = torch.full((L,), -1, dtype=torch.long, device=retrieved.device)  # [R]
        else:
            positions = torch.arange(L, device=retrieved.device)  # [S]
            if first is not None:
                positions = positions[None, :] - first[:, None]  # [N, S]
        if self.persistent is None:
            return retrieved, positions
        P = self.persistent.num_tokens
        prefix = torch.cat([self.persistent.prefix().to(retrieved.dtype).expand(N, -1, -1), retrieved], dim=1)
        return prefix, torch.cat([positions.new_full((*positions.shape[:-1], P), -1), positions], dim=-1)
