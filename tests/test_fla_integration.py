"""``NeuralMemory`` inside an fla model: it takes the place of fla's token mixer in
``GatedDeltaNetForCausalLM``, trains, and decodes through fla's ``Cache`` with ``generate()``.
On CUDA one layer stays fla's own GatedDeltaNet, so the two kinds sit side by side; on CPU every
mixer is ours (fla's kernels need a GPU driver here).

Upstream failure, named: from Transformers 5.24 on, ``generate()`` hands a model its cache as
``cache``. fla's models (0.6.0, the newest release) take it only as ``past_key_values``: the real
cache travels on in ``**kwargs`` and ``FLAModel.forward`` builds a fresh, empty ``Cache`` for
``past_key_values`` at every step, so fla's own layers (which read ``past_key_values`` alone)
decode every new token without its history, silently
(``test_what_fla_hands_its_layers_while_generating`` measures it). Our layers, given two different
caches, raise instead of choosing one. On Transformers <= 5.23, fla's generation is correct and
ours inside it equals the full forward."""

import inspect
from importlib.metadata import version

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from fla.layers.utils import get_layer_cache, update_layer_cache
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from fla.models.modeling_utils import FLAModel

from titans_layers.models.generation import LM_CACHE_FIELD
from titans_layers.modules import NeuralMemory

# Transformers >= 5.24 passes the cache as `cache` (its outputs declare that field since the same release)
TRANSFORMERS_PASSES_CACHE = LM_CACHE_FIELD == "cache"
FLA_TAKES_CACHE = "cache" in inspect.signature(FLAModel.forward).parameters
FLA_LOSES_ITS_CACHE = TRANSFORMERS_PASSES_CACHE and not FLA_TAKES_CACHE
FLA_VERSION = version("fla-core")


@pytest.fixture
def fla_model(device, monkeypatch):
    model = _fla_host(device, monkeypatch)
    for i, layer in enumerate(model.model.layers):
        if device == "cuda" and i == 0:
            continue
        layer.attn = NeuralMemory(64, 2, memory="linear" if i % 2 else "mlp", chunk_size=8, layer_idx=i)
    return model.to(device).float()


def _fla_host(device, monkeypatch) -> GatedDeltaNetForCausalLM:
    if device != "cuda":  # fla's SwiGLU kernel autotunes, which needs a GPU driver: use its definition
        import fla.modules.mlp
        monkeypatch.setattr(fla.modules.mlp, "swiglu", lambda gate, y: F.silu(gate) * y)
    torch.manual_seed(0)
    config = GatedDeltaNetConfig(hidden_size=64, num_hidden_layers=3, num_heads=2, head_dim=32, expand_v=1,
                                 vocab_size=97, fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False)
    return GatedDeltaNetForCausalLM(config)


def test_memory_layer_trains_inside_an_fla_model(fla_model, device):
    ids = torch.randint(0, 97, (2, 29), device=device)
    out = fla_model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in fla_model.named_parameters():
        if ".attn." in name and p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_generate_with_fla_cache_equals_full_forward(fla_model, device):
    """Greedy ``generate()`` through fla's Cache picks, at every step, the argmax of a fresh full
    forward over the tokens so far; the cached logits equal the full forward's. Where fla's model
    loses the cache (see the module docstring), our layers refuse to decode instead."""
    fla_model.eval()
    prompt = torch.randint(0, 97, (2, 11), device=device)
    if FLA_LOSES_ITS_CACHE:
        with torch.no_grad(), pytest.raises(ValueError, match="two different caches"):
            fla_model.generate(prompt, max_new_tokens=3, do_sample=False)
        return
    with torch.no_grad():
        out = fla_model.generate(prompt, max_new_tokens=14, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        full = fla_model(out.sequences).logits  # [B, T, vocab]
    cached = torch.stack(out.logits, dim=1)  # [B, 14, vocab]
    reference = full[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, prompt.shape[1]:], reference.argmax(-1))


class _FlaCacheProbe(nn.Module):
    """Stands in for fla's token mixers in how they use the cache (``get_layer_cache`` on
    ``past_key_values``, ``**kwargs`` ignored, as fla's ``GatedDeltaNet.forward`` does): records how
    many tokens the cache it is handed has seen, and adds one token to it."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx, self.seen = layer_idx, []

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        last = get_layer_cache(self, past_key_values)
        self.seen.append(0 if last is None else int(last["recurrent_state"]))
        if use_cache:
            update_layer_cache(self, past_key_values, offset=hidden_states.shape[1],
                               recurrent_state=torch.tensor(self.seen[-1] + hidden_states.shape[1]))
        return hidden_states, None, past_key_values


def test_what_fla_hands_its_layers_while_generating(device, monkeypatch):
    """fla's model and cache with probe mixers: what a layer of fla finds in ``past_key_values`` at
    each ``generate()`` step. Transformers <= 5.23 (or an fla that takes ``cache``): the history
    (11 prompt tokens, then one more per step). Transformers >= 5.24 with fla 0.6.0: an empty cache
    at every step, i.e. fla's own layers decode each token without its history."""
    model = _fla_host(device, monkeypatch)
    for i, layer in enumerate(model.model.layers):
        layer.attn = _FlaCacheProbe(i)
    model = model.to(device).float().eval()
    with torch.no_grad():
        model.generate(torch.randint(0, 97, (1, 11), device=device), max_new_tokens=4, do_sample=False)
    seen = model.model.layers[0].attn.seen
    versions = f"transformers {transformers.__version__}, fla {FLA_VERSION}"
    if FLA_LOSES_ITS_CACHE:
        assert seen == [0, 0, 0, 0], f"fla hands its layers an empty cache at every step ({versions}): {seen}"
    else:
        assert seen == [0, 11, 12, 13], f"fla hands its layers the cache of the steps so far ({versions}): {seen}"
