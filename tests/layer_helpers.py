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


def padding_call(spec: dict) -> tuple[int, dict]:
    """A bad-padding test case ``{"B": rows, "cu": offsets, "mask": one row}`` (each optional) as
    ``(B, keyword arguments of the layer call)``: ``cu_seqlens`` and an ``attention_mask`` of B equal rows."""
    B = spec.get("B", 1)
    extra = {}
    if "cu" in spec:
        extra["cu_seqlens"] = torch.tensor(spec["cu"])
    if "mask" in spec:
        extra["attention_mask"] = torch.tensor([spec["mask"]] * B)
    return B, extra
