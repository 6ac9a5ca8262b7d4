"""Helpers shared by the layer tests."""

import torch
from fla.models.utils import Cache


def decode_token_by_token(layer, x, prefill: int, attention_mask=None):
    """Prefill ``x[:, :prefill]`` then feed one token per call through fla's Cache; returns the
    concatenated outputs ``[B, T, D]`` and the cache."""
    mask = (lambda t: None) if attention_mask is None else (lambda t: attention_mask[:, :t])
    with torch.no_grad():
        cache = Cache()
        o, _, cache = layer(x[:, :prefill], attention_mask=mask(prefill), past_key_values=cache, use_cache=True)
        outs = [o]
        for t in range(prefill, x.shape[1]):
            o, _, cache = layer(x[:, t:t + 1], attention_mask=mask(t + 1), past_key_values=cache, use_cache=True)
            outs.append(o)
    return torch.cat(outs, dim=1), cache
