"""The token mixers of the Titans blocks other than MAC (``mac.py``): LMM, SWA, MAG and MAL.

Every mixer has fla's layer interface, ``forward(hidden_states [B, T, D], attention_mask=None,
past_key_values=None, use_cache=False, output_attentions=False, **kwargs) -> (o [B, T, D], None,
past_key_values)``, so the shared block treats them and fla's own layers alike. Each stateful
sublayer has its own index in fla's ``Cache``; a mixer takes its indices from the model
(:func:`~titans_layers.models.blocks.cache_slots`).

Persistent tokens. They enter the attention as ``prefix_states`` visible to every position
(not as positions, so the window never drops them and decoding needs nothing extra). The memory's
state after writing N_p fixed tokens does not depend on the data: it is folded into the memory's
learned initial state (SPEC §2), so the memory runs over ``x`` alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from titans_layers.models.builders import make_attention, make_memory, make_persistent
from titans_layers.models.configuration_titans import TitansConfig
from titans_layers.modules import MemoryGate
from titans_layers.modules.checks import resolve_cache


def _prefix(persistent) -> torch.Tensor | None:
    return None if persistent is None else persistent.prefix()  # [1, N_p, D]


class MemoryMixer(nn.Module):
    """LMM: the neural memory alone, ``o = M(x)``. One cache index."""

    def __init__(self, config: TitansConfig, cache_indices: list[int]):
        super().__init__()
        self.memory = make_memory(config, cache_indices[0])

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        return self.memory(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                           use_cache=use_cache, **kwargs)


class AttentionMixer(nn.Module):
    """The "swa" block: plain sliding-window attention over ``window_size`` tokens (no persistent tokens),
    the attention layer of a hybrid stack. One cache index."""

    def __init__(self, config: TitansConfig, cache_indices: list[int]):
        super().__init__()
        self.attention = make_attention(config, config.window_size, cache_indices[0])

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        return self.attention(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                              use_cache=use_cache, **kwargs)


class MAGMixer(nn.Module):
    """MAG (memory as gate): ``o = gate(SWA([p || x]), M(x))`` with the two branches in parallel
    and :class:`~titans_layers.modules.MemoryGate` (``norm(y) * act(norm(m))``). Cache indices:
    memory, attention."""

    def __init__(self, config: TitansConfig, cache_indices: list[int]):
        super().__init__()
        self.memory = make_memory(config, cache_indices[0])
        self.attention = make_attention(config, config.window_size, cache_indices[1])
        self.persistent = make_persistent(config)
        self.gate = MemoryGate(config.hidden_size, config.gate_activation, config.norm_eps)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        common = dict(attention_mask=attention_mask, past_key_values=past_key_values, use_cache=use_cache)
        y, _, past_key_values = self.attention(hidden_states, prefix_states=_prefix(self.persistent), **common,
                                               **kwargs)  # [B, T, D]
        m, _, past_key_values = self.memory(hidden_states, **common, **kwargs)  # [B, T, D]
        return self.gate(y, m), None, past_key_values


class MALMixer(nn.Module):
    """MAL (memory as layer): the memory layer, then the sliding-window attention layer, each with
    its residual: ``m = M(x)``, ``o = m + SWA([p || x + m])`` (the paper's ``y = M(x~)``,
    ``o = SW-Attn(y)`` as two pre-norm residual sublayers inside one block, whose own residual adds
    x). Without the two residuals (``o = SWA(M(x))``) the attention sees only the memory's reads,
    which carry no token's identity at initialisation, and the memory's read reaches the output only
    through an attention average: a small MAL did not learn associative recall that LMM learns
    (measured in ``docs/experiments.md``). Cache indices: memory, attention."""

    def __init__(self, config: TitansConfig, cache_indices: list[int]):
        super().__init__()
        self.memory = make_memory(config, cache_indices[0])
        self.attention = make_attention(config, config.window_size, cache_indices[1])
        self.persistent = make_persistent(config)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
                output_attentions=False, **kwargs):
        past_key_values = resolve_cache(past_key_values, kwargs)
        common = dict(attention_mask=attention_mask, past_key_values=past_key_values, use_cache=use_cache)
        m, _, past_key_values = self.memory(hidden_states, **common, **kwargs)  # [B, T, D]
        y, _, past_key_values = self.attention(hidden_states + m, prefix_states=_prefix(self.persistent), **common,
                                               **kwargs)  # [B, T, D]
        return m + y, None, past_key_values
