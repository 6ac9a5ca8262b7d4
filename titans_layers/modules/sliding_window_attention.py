"""``SlidingWindowAttention``: causal softmax attention over a window, with prefix tokens, rotary
positions, grouped KV heads and a KV cache that keeps only the window. Pure PyTorch (SDPA), so it
runs on any device; on CUDA with flash-attn installed, calls without prefix tokens or a cached
window (training, prefill) run flash-attn's sliding-window varlen kernel instead."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache

from titans_layers.modules.checks import (check_hidden_states, check_padding, head_dim_for, positive_finite, positive_int,
                                         resolve_cache)
from titans_layers.modules.short_conv import sequence_starts

try:  # the fast GPU path, where flash-attn is installed
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

ATTN_BACKENDS = ("auto", "torch")


class WindowKVCache(NamedTuple):
    """Per-sequence KV cache of a sliding window: the last ``window - 1`` keys and values
    (right-aligned; rotary already applied to keys) and how many tokens each sequence has seen."""

    k: torch.Tensor  # [N, window - 1, H_kv, d]
    v: torch.Tensor  # [N, window - 1, H_kv, d]
    seen: torch.Tensor  # [N] int64


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of ``x`` ``[..., T, H, d]`` at integer
    ``positions`` ``[..., T]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d // 2 * 2, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., T, d/2]
    cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]  # [..., T, 1, d/2]
    x1, x2 = x[..., : d // 2].float(), x[..., d // 2: d // 2 * 2].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if d % 2:
        out = torch.cat([out, x[..., -1:].float()], dim=-1)
    return out.to(x.dtype)


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention where position t sees positions ``t - window + 1 .. t`` of its own
    sequence, plus prefix tokens (persistent or retrieved memory) given per call.

    Args:
        hidden_size: D. num_heads: query heads. num_kv_heads: key/value heads (grouped-query
        attention; default num_heads). head_dim: default ``hidden_size // num_heads``.
        window_size: W, tokens each position sees (itself included).
        rope_base: rotary base, a finite number > 0 (prefix tokens get no rotary: they have no position).
        attn_backend: "auto" (flash-attn's sliding-window kernel where it applies: CUDA, fp16/bf16,
            flash-attn installed, no prefix tokens, no cached window; SDPA otherwise) or "torch"
            (always SDPA). Both compute the same attention.
        layer_idx: index of the layer in a model, for the cache.

    ``forward(hidden_states [B, T, D], attention_mask=None, past_key_values=None, use_cache=False,
    output_attentions=False, prefix_states=None, prefix_positions=None, **kwargs)
    -> (o [B, T, D], None, past_key_values)``. ``prefix_states`` ``[N, P, D]`` (N sequences:
    B, or ``len(cu_seqlens) - 1``; or ``[1, P, D]`` shared) are extra keys/values; prefix token p
    is visible to the call's token t when ``prefix_positions[p] <= t`` (``[P]`` int, or ``[N, P]``
    one row per sequence; -1 = always: MAC's rule that position j sees retrieved token i only when
    i <= j; t counts from the call's first token of each sequence). ``attention_mask`` ``[B, T_total]``
    (0 = padding, 1 = token) or ``cu_seqlens`` ``[N + 1]`` in kwargs (B = 1), not both, as in
    :class:`~titans_layers.modules.NeuralMemory`; the KV cache holds one row per sequence, and a call
    with a cache and ``use_cache=False`` reads it and leaves it untouched. ``cp_context=`` in kwargs:
    this rank's slice ``[1, n, D]`` under context parallelism, the window reaching into the preceding
    ranks (:mod:`~titans_layers.modules.context_parallel`; SDPA path, no cache).
    """

    def __init__(self, hidden_size: int, num_heads: int, window_size: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_base: float = 10000.0, attn_backend: str = "auto",
                 layer_idx: int | None = None):
        super().__init__()
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"`attn_backend` must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
        self.attn_backend = attn_backend
        num_kv_heads = num_kv_heads or num_heads
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("window_size", window_size),
                            ("num_kv_heads", num_kv_heads)):
            positive_int(name, value)
        if num_heads % num_kv_heads:
            raise ValueError(f"`num_heads` ({num_heads}) must be a multiple of `num_kv_heads` ({num_kv_heads})")
        head_dim = head_dim_for(hidden_size, num_heads, head_dim)
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, \
            head_dim
        self.window_size, self.layer_idx = window_size, layer_idx
        self.rope_base = positive_finite("rope_base", rope_base)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    @staticmethod
    def _max_length(x: torch.Tensor, lens: torch.Tensor, packed: bool) -> int:
        """Query slots per sequence: the longest sequence, read on the host; under ``torch.compile``
        (no host reads) all packed tokens, an upper bound that keeps the shapes static."""
        if not packed:
            return x.shape[1]
        if torch.compiler.is_compiling():
            return x.shape[1]
        return int(lens.max().item()) if lens.numel() else 0

    def _heads(self, x: torch.Tensor, proj: nn.Linear, heads: int) -> torch.Tensor:
        return proj(x).unflatten(-1, (heads, self.head_dim))

    def _flash_applies(self, q: torch.Tensor) -> bool:
        return (self.attn_backend == "auto" and flash_attn_varlen_func is not None and q.is_cuda
                and q.dtype in (torch.float16, torch.bfloat16) and not torch.compiler.is_compiling())

    def _attend_flash(self, q, k, v, cu_seqlens, L: int) -> torch.Tensor:
        """flash-attn's causal sliding window over packed tokens: q ``[n, Hq, d]``, k, v
        ``[n, Hk, d]`` -> ``[n, Hq, d]``."""
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=True, window_size=(self.window_size - 1, 0))

    def _attend_sdpa(self, qp, kp, vp, cache: WindowKVCache, lens, L: int, prefix_states, prefix_positions):
        """SDPA in query blocks of W over ``[prefix || cached window || new]`` keys, per sequence:
        qp ``[N, L, Hq, d]``, kp, vp ``[N, L, Hk, d]`` -> ``[N, L, Hq, d]``."""
        N = qp.shape[0]
        W, Hq, Hk, d = self.window_size, self.num_heads, self.num_kv_heads, self.head_dim
        # per-sequence layout: queries [N, L], keys [N, P + (W - 1) + L] = prefix, cached window, new
        P = 0
        keys, values = [cache.k.to(kp.dtype), kp], [cache.v.to(vp.dtype), vp]
        if prefix_states is not None:
            if prefix_states.ndim != 3 or prefix_states.shape[0] not in (1, N) or \
                    prefix_states.shape[-1] != self.hidden_size:
                raise ValueError(f"`prefix_states` must have shape [N or 1, P, {self.hidden_size}] with N = {N}, "
                                 f"got {list(prefix_states.shape)}")
            P = prefix_states.shape[1]
            pk = self._heads(prefix_states, self.k_proj, Hk).expand(N, -1, -1, -1)
            pv = self._heads(prefix_states, self.v_proj, Hk).expand(N, -1, -1, -1)
            keys, values = [pk] + keys, [pv] + values
        if prefix_positions is None:
            prefix_positions = torch.full((P,), -1, dtype=torch.long, device=qp.device)
        elif prefix_positions.shape not in ((P,), (N, P)):
            raise ValueError(f"`prefix_positions` must have shape [P] = [{P}] or [N, P] = [{N}, {P}], "
                             f"got {list(prefix_positions.shape)}")
        if prefix_positions.ndim == 1:
            prefix_positions = prefix_positions[None]  # [1 or N, P]
        K_all, V_all = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # [N, P + W - 1 + L, Hk, d]

        # what each key is: its position relative to the call's first token, and whether it exists
        seen = cache.seen[:, None]  # [N, 1]
        cache_rel = torch.arange(-(W - 1), 0, device=qp.device)[None, :].expand(N, -1)  # [N, W - 1]
        cache_ok = (seen + cache_rel) >= 0
        new_rel = torch.arange(L, device=qp.device)[None, :].expand(N, -1)
        new_ok = new_rel < lens[:, None]
        key_rel = torch.cat([cache_rel, new_rel], dim=1)  # [N, W - 1 + L]
        key_ok = torch.cat([cache_ok, new_ok], dim=1)

        out = qp.new_zeros(N, L, Hq, d)
        block = W
        for t0 in range(0, L, block):
            t1 = min(L, t0 + block)
            k0 = t0  # window keys for queries t0..t1-1: relative positions t0-W+1 .. t1-1 -> slots t0 .. t1+W-2
            k1 = t1 + W - 1
            kb = torch.cat([K_all[:, :P], K_all[:, P + k0:P + k1]], dim=1)  # [N, P + span, Hk, d]
            vb = torch.cat([V_all[:, :P], V_all[:, P + k0:P + k1]], dim=1)
            tq = torch.arange(t0, t1, device=qp.device)  # [bq]
            rel = key_rel[:, k0:k1]  # [N, span]
            visible = key_ok[:, None, k0:k1] & (rel[:, None, :] <= tq[None, :, None]) & \
                (rel[:, None, :] > tq[None, :, None] - W)  # [N, bq, span]
            pre = (prefix_positions[:, None, :] <= tq[None, :, None]).expand(N, -1, -1)  # [N, bq, P]
            mask = torch.cat([pre, visible], dim=-1)  # [N, bq, P + span]
            # padding query slots (past a sequence's end) see everything: finite, and discarded
            is_pad = tq[None, :] >= lens[:, None]  # [N, bq]
            mask = (mask | is_pad[:, :, None])[:, None]  # [N, 1, bq, P + span]
            qb = qp[:, t0:t1].transpose(1, 2)  # [N, Hq, bq, d]
            kbh = kb.transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)  # [N, Hq, P + span, d]
            vbh = vb.transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
            ob = F.scaled_dot_product_attention(qb, kbh, vbh, attn_mask=mask)  # [N, Hq, bq, d]
            out[:, t0:t1] = ob.transpose(1, 2)
        return out

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values=None,
                use_cache: bool | None = False, output_attentions: bool | None = False,
                prefix_states: torch.Tensor | None = None, prefix_positions: torch.Tensor | None = None, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        check_hidden_states(hidden_states, self.hidden_size, self.q_proj.weight.dtype)
        cp_context = kwargs.pop("cp_context", None)
        if cp_context is not None:  # this rank's slice of a batch split across ranks
            from titans_layers.modules.context_parallel import attention_forward_cp, check_cp_call
            cp = check_cp_call("SlidingWindowAttention", cp_context, hidden_states, attention_mask, past_key_values,
                               use_cache, kwargs)
            return attention_forward_cp(self, hidden_states, cp, prefix_states, prefix_positions), None, None
        check_padding(hidden_states, attention_mask, kwargs.get("cu_seqlens"))
        B, T, _ = hidden_states.shape
        x, indices, cu_seqlens = unpad_hidden_states(hidden_states, kwargs.get("cu_seqlens"), attention_mask, T)
        flat = x.reshape(-1, self.hidden_size)  # [n_tokens, D]
        n_tokens = flat.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (B + 1) * T, T, device=x.device)
        N = cu_seqlens.numel() - 1
        W, Hq, Hk, d = self.window_size, self.num_heads, self.num_kv_heads, self.head_dim

        last = get_layer_cache(self, past_key_values)
        cache: WindowKVCache | None = last["recurrent_state"] if last is not None else None
        if cache is not None and cache.seen.shape != (N,):
            raise ValueError(f"the cached attention state has {cache.seen.shape[0]} sequences, this call has {N}")
        if cache is None:
            cache = WindowKVCache(k=flat.new_zeros(N, W - 1, Hk, d), v=flat.new_zeros(N, W - 1, Hk, d),
                                  seen=torch.zeros(N, dtype=torch.long, device=x.device))
        seq, pos = sequence_starts(cu_seqlens, n_tokens)  # [n_tokens]
        lens = cu_seqlens[1:] - cu_seqlens[:-1]  # [N]
        L = self._max_length(x, lens, packed=indices is not None or kwargs.get("cu_seqlens") is not None)
        q = rotary(self._heads(flat, self.q_proj, Hq), cache.seen[seq] + pos, self.rope_base)  # [n, Hq, d]
        k = rotary(self._heads(flat, self.k_proj, Hk), cache.seen[seq] + pos, self.rope_base)  # [n, Hk, d]
        v = self._heads(flat, self.v_proj, Hk)

        def padded(t):  # [n_tokens, ...] -> [N, L, ...], sequence by sequence
            out = t.new_zeros(N, L, *t.shape[1:])
            out[seq, pos] = t
            return out

        fresh = last is None or last["recurrent_state"] is None
        if prefix_states is None and fresh and self._flash_applies(q):
            out = self._attend_flash(q, k, v, cu_seqlens, L)  # [n_tokens, Hq, d]
            kp, vp = (padded(k), padded(v)) if use_cache else (None, None)
        else:
            qp, kp, vp = padded(q), padded(k), padded(v)
            out = self._attend_sdpa(qp, kp, vp, cache, lens, L, prefix_states, prefix_positions)[seq, pos]
        o = self.o_proj(out.flatten(-2))  # [n_tokens, D]

        if use_cache:
            total = torch.cat([cache.k.to(k.dtype), kp], dim=1), torch.cat([cache.v.to(v.dtype), vp], dim=1)
            take = (W - 1 + lens)[:, None] - torch.arange(W - 1, 0, -1, device=x.device)[None, :]  # [N, W - 1]
            rows = torch.arange(N, device=x.device)[:, None]
            new_cache = WindowKVCache(k=total[0][rows, take], v=total[1][rows, take], seen=cache.seen + lens)
            update_layer_cache(self, past_key_values, recurrent_state=new_cache, offset=T)
        o = repad_hidden_states(o.reshape(1, n_tokens, -1) if indices is not None else o.reshape(B, T, -1),
                                indices, B, T)
        return o, None, past_key_values
