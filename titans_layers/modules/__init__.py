"""Layers with fla's layer interface: ``forward(hidden_states, attention_mask=None,
past_key_values=None, use_cache=False, output_attentions=False, **kwargs) -> (o, None, cache)``."""

from titans_layers.modules.neural_memory import NeuralMemory
from titans_layers.modules.short_conv import ShortConvolution

__all__ = ["NeuralMemory", "ShortConvolution"]
