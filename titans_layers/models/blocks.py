"""The one residual block every layer of a Titans model uses, its MLP, and the cache layout."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from titans_layers.models.builders import make_fla_mixer
from titans_layers.models.configuration_titans import FLA_BLOCKS, TitansConfig
from titans_layers.models.mac import MACMixer, read_only_states
from titans_layers.models.mixers import AttentionMixer, MAGMixer, MALMixer, MemoryMixer
from titans_layers.modules.checks import resolve_cache

# Stateful sublayers per block kind, each with its own index in fla's Cache:
# MAC: its own state, the memory, the attention; MAG / MAL: the memory, the attention.
CACHE_SLOTS = {"mac": 3, "mag": 2, "mal": 2, "lmm": 1, "swa": 1, **{kind: 1 for kind in FLA_BLOCKS}}
MIXERS = {"mac": MACMixer, "mag": MAGMixer, "mal": MALMixer, "lmm": MemoryMixer, "swa": AttentionMixer}


def cache_slots(block_types: list[str]) -> list[list[int]]:
    """Cache indices of each block's stateful sublayers, numbered consecutively through the stack,
    e.g. ``["mac", "mal"] -> [[0, 1, 2], [3, 4]]``."""
    slots, next_idx = [], 0
    for kind in block_types:
        if kind not in CACHE_SLOTS:
            raise ValueError(f"block kind must be one of {tuple(CACHE_SLOTS)}, got {kind!r}")
        slots.append(list(range(next_idx, next_idx + CACHE_SLOTS[kind])))
        next_idx += CACHE_SLOTS[kind]
    return slots


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: ``[..., D] -> [..., D]`` through ``intermediate_size``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TitansBlock(GradientCheckpointingLayer):
    """Pre-norm residual block shared by every kind:
    ``h = x + mixer(norm(x))``, ``out = h + mlp(norm(h))`` (RMSNorm, SwiGLU MLP).

    Args:
        config: the model config.
        kind: the block kind, from ``BLOCK_TYPES`` (the mixer: MAC, MAG, MAL, LMM, sliding-window
            attention, or fla's GatedDeltaNet / DeltaNet / Mamba2).
        cache_indices: the mixer's cache indices, from :func:`cache_slots`.

    ``forward(hidden_states [B, T, D], attention_mask=None, past_key_values=None, use_cache=False,
    **kwargs) -> (hidden_states [B, T, D], past_key_values)``; ``kwargs`` (e.g. ``cu_seqlens``) go to
    the mixer. Under gradient checkpointing the block runs without a cache (Transformers drops it).
    With ``use_cache=False`` a given cache is read and left untouched, fla's mixers included (they
    write whenever they get a cache: they get a private copy of their entry instead).
    """

    def __init__(self, config: TitansConfig, kind: str, cache_indices: list[int]):
        super().__init__()
        if len(cache_indices) != CACHE_SLOTS.get(kind, -1):
            raise ValueError(f"`cache_indices` of a {kind!r} block must hold {CACHE_SLOTS.get(kind)} indices, "
                             f"got {cache_indices}")
        self.kind = kind
        self.mixer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        if kind in FLA_BLOCKS:
            self.mixer = make_fla_mixer(kind, config, cache_indices[0])
        else:
            self.mixer = MIXERS[kind](config, cache_indices)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.mlp_intermediate_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values=None,
                use_cache: bool | None = False, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        cache = past_key_values
        if self.kind in FLA_BLOCKS and kwargs.get("cp_context") is not None:
            raise ValueError(f"a {self.kind!r} block (fla's mixer) does not take `cp_context`: context parallelism "
                             "covers the Titans blocks (mac, mag, mal, lmm, swa)")
        if self.kind in FLA_BLOCKS and past_key_values is not None and not use_cache:
            cache = read_only_states(past_key_values, [self.mixer.layer_idx])
        h, _, _ = self.mixer(self.mixer_norm(hidden_states), attention_mask=attention_mask, past_key_values=cache,
                             use_cache=use_cache, **kwargs)
        hidden_states = hidden_states + h  # [B, T, D]
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, past_key_values
