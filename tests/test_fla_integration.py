"""``NeuralMemory`` inside an fla model: it takes the place of fla's token mixer in
``GatedDeltaNetForCausalLM``, trains, and decodes through fla's ``Cache`` with ``generate()``.
On CUDA one layer stays fla's own GatedDeltaNet, so the two kinds sit side by side; on CPU every
mixer is ours (fla's kernels need a GPU driver here)."""

import pytest
import torch
import torch.nn.functional as F
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

from titans_layers.modules import NeuralMemory


@pytest.fixture
def fla_model(device, monkeypatch):
    if device != "cuda":  # fla's SwiGLU kernel autotunes, which needs a GPU driver: use its definition
        import fla.modules.mlp
        monkeypatch.setattr(fla.modules.mlp, "swiglu", lambda gate, y: F.silu(gate) * y)
    torch.manual_seed(0)
    config = GatedDeltaNetConfig(hidden_size=64, num_hidden_layers=3, num_heads=2, head_dim=32, expand_v=1,
                                 vocab_size=97, fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False)
    model = GatedDeltaNetForCausalLM(config)
    for i, layer in enumerate(model.model.layers):
        if device == "cuda" and i == 0:
            continue
        layer.attn = NeuralMemory(64, 2, memory="linear" if i % 2 else "mlp", chunk_size=8, layer_idx=i)
    return model.to(device).float()


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
    forward over the tokens so far; the cached logits equal the full forward's."""
    fla_model.eval()
    prompt = torch.randint(0, 97, (2, 11), device=device)
    with torch.no_grad():
        out = fla_model.generate(prompt, max_new_tokens=14, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        full = fla_model(out.sequences).logits  # [B, T, vocab]
    cached = torch.stack(out.logits, dim=1)  # [B, 14, vocab]
    reference = full[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, prompt.shape[1]:], reference.argmax(-1))
