"""Layers with fla's layer interface: ``forward(hidden_states, attention_mask=None,
past_key_values=None, use_cache=False, output_attentions=False, **kwargs) -> (o, None, cache)``,
plus the pieces the Titans blocks combine them with."""

from titans_layers.modules.gating import MemoryGate
from titans_layers.modules.neural_memory import NeuralMemory
from titans_layers.modules.persistent_memory import PersistentMemory
from titans_layers.modules.short_conv import ShortConvolution
from titans_layers.modules.sliding_window_attention import SlidingWindowAttention, WindowKVCache

__all__ = ["MemoryGate", "NeuralMemory", "PersistentMemory", "ShortConvolution", "SlidingWindowAttention",
           "WindowKVCache"]
