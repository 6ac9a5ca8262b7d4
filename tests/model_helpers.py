"""Helpers shared by the model tests: tiny configs and models, cached decoding, comparisons."""

import torch
from fla.models.utils import Cache

from titans_layers.models import TitansConfig, TitansForCausalLM
from titans_layers.models.generation import LM_CACHE_FIELD

VARIANTS = ["mac", "mag", "mal", "lmm", "mac_mal"]
MEMORIES = ["linear", "mlp"]
VOCAB = 100
# segment 5, memory chunk 4, window 6: prefill and split points fall mid-segment and mid-chunk
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=4, segment_size=5,
            window_size=6, num_persistent_tokens=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def tiny_config(variant="mac", memory="linear", **overrides) -> TitansConfig:
    """A 2-layer, width-32 config (overrides win; ``block_types`` in overrides replaces the variant)."""
    args = dict(TINY, variant=variant, memory=memory)
    args.update(overrides)
    return TitansConfig(**args)


def tiny_model(variant="mac", memory="linear", seed=0, **overrides) -> TitansForCausalLM:
    """A seeded tiny causal LM in eval mode."""
    torch.manual_seed(seed)
    return TitansForCausalLM(tiny_config(variant, memory, **overrides)).eval()


def token_ids(B=2, T=17, seed=1) -> torch.Tensor:
    """Random token ids ``[B, T]`` in ``[1, VOCAB)`` (0 is the padding token)."""
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs) -> torch.Tensor:
    """Full-forward logits ``[B, T, V]`` without a cache."""
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def cache_of(output) -> Cache:
    """The cache of a model output, under the field name of the installed Transformers (``cache``
    from 5.24 on, ``past_key_values`` before)."""
    return getattr(output, LM_CACHE_FIELD)


def decode_logits(model, ids, prefill: int, attention_mask=None) -> tuple[torch.Tensor, Cache]:
    """Prefill ``ids[:, :prefill]`` then feed one token per call through fla's ``Cache``; returns
    the logits of every position ``[B, T, V]`` and the cache."""
    mask = (lambda t: None) if attention_mask is None else (lambda t: attention_mask[:, :t])
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=mask(prefill), past_key_values=Cache(), use_cache=True)
        outs, cache = [out.logits], cache_of(out)
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask(t + 1), past_key_values=cache, use_cache=True)
            outs.append(out.logits)
            cache = cache_of(out)
    return torch.cat(outs, dim=1), cache


def causality_violations(model, ids, j: int) -> tuple[float, float]:
    """Change token j of every row: ``(largest change of a logit before j, largest change at or
    after j)``. A causal model gives ``(0 up to rounding, > 0)``."""
    changed = ids.clone()
    changed[:, j] = (ids[:, j] % (VOCAB - 1)) + 1  # another non-padding token
    a, b = logits(model, ids), logits(model, changed)
    before = (a[:, :j] - b[:, :j]).abs().max().item() if j else 0.0
    return before, (a[:, j:] - b[:, j:]).abs().max().item()
