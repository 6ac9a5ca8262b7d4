"""``torch.compile(fullgraph=True)`` traces the ops and the layers (no graph breaks) and the
compiled code equals eager: outputs, final states and every gradient."""

import pytest
import torch

from titans_layers.modules import NeuralMemory, SlidingWindowAttention
from titans_layers.ops import (chunk_mlp_memory, chunk_momentum_delta_rule, fused_recurrent_mlp_memory,
                               fused_recurrent_momentum_delta_rule, library, naive_chunk_mlp_memory,
                               naive_chunk_momentum_delta_rule)
from titans_layers.testing import assert_close, make_case
from titans_layers.testing.contract import run_with_grads, state_fields

OPS = {
    "naive_chunk_momentum_delta_rule": (naive_chunk_momentum_delta_rule, "linear"),
    "chunk_momentum_delta_rule": (chunk_momentum_delta_rule, "linear"),
    "fused_recurrent_momentum_delta_rule": (fused_recurrent_momentum_delta_rule, "linear"),
    "naive_chunk_mlp_memory": (naive_chunk_mlp_memory, "mlp"),
    "chunk_mlp_memory": (chunk_mlp_memory, "mlp"),
    "fused_recurrent_mlp_memory": (fused_recurrent_mlp_memory, "mlp"),
}
TOL = 1e-5


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["free", "clipped"])
@pytest.mark.parametrize("family", ["linear", "mlp"])
def test_custom_op_passes_opcheck(family, clip, device):
    """Schema, fake implementation, autograd registration and AOT dispatch of the custom op."""
    case = make_case(seed=1, B=2, T=11, H=2, K=8, V=8, dtype=torch.float32, chunk_size=4, state="MS",
                     family=family, device=device)
    name = "momentum_delta_rule" if family == "linear" else "mlp_memory"
    weights = list(case.initial_state)
    weights = weights + (weights[:1] if family == "linear" else weights[:2])  # anchors = weights
    weights = [w.clone().requires_grad_() for w in weights]
    inputs = [x.clone().requires_grad_() for x in case.inputs]
    offset = torch.zeros(2, dtype=torch.long, device=device)
    torch.library.opcheck(library.memory_update, (*inputs, weights, offset, None, name, "naive_chunk", 4, 4,
                                                  "silu", False, clip))


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_compiled_op_equals_eager(name, varlen, device):
    op, family = OPS[name]
    lengths = [5, 19, 13] if varlen else None
    case = make_case(seed=3, B=1 if varlen else 2, T=37, H=2, K=16, V=16, dtype=torch.float32, chunk_size=16,
                     state="MS", lengths=lengths, family=family, device=device)
    eager = run_with_grads(op, case, case.inputs, case.initial_state, cotangent_seed=0)
    compiled = run_with_grads(_compiled(op), case, case.inputs, case.initial_state, cotangent_seed=0)
    assert_close("o", compiled[0], eager[0], TOL)
    for field in state_fields(case):
        assert_close(field, getattr(compiled[1], field), getattr(eager[1], field), TOL)
    assert torch.equal(compiled[1].offset, eager[1].offset)
    for key, g in eager[2].items():
        assert g is not None, key
        assert_close(f"d{key}", compiled[2][key], g, TOL)


def _layer_grads(layer, run, x, kwargs):
    layer.zero_grad()
    o = run(x, **kwargs)[0]
    (o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum().backward()
    return o.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}


LAYERS = {
    "memory-linear": lambda: NeuralMemory(32, 2, memory="linear", chunk_size=8),
    "memory-clipped": lambda: NeuralMemory(32, 2, memory="mlp", chunk_size=8, max_update_norm=0.01),
    "memory-mlp": lambda: NeuralMemory(32, 2, memory="mlp", chunk_size=8),
    "swa": lambda: SlidingWindowAttention(32, 4, window_size=6, num_kv_heads=2),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_compiled_layer_equals_eager(name, varlen, device):
    torch.manual_seed(0)
    layer = LAYERS[name]().to(device)
    if varlen:
        x, kwargs = torch.randn(1, 29, 32, device=device), dict(cu_seqlens=torch.tensor([0, 4, 21, 29],
                                                                                           device=device))
    else:
        x, kwargs = torch.randn(2, 29, 32, device=device), {}
    o_eager, g_eager = _layer_grads(layer, layer, x, kwargs)
    o_compiled, g_compiled = _layer_grads(layer, _compiled(layer), x, kwargs)
    assert_close("o", o_compiled, o_eager, TOL)
    for n, g in g_eager.items():
        assert_close(f"d{n}", g_compiled[n], g, TOL)


def test_compiled_attention_with_prefix_tokens(device):
    torch.manual_seed(0)
    layer = SlidingWindowAttention(32, 4, window_size=5).to(device)
    x, prefix = torch.randn(2, 17, 32, device=device), torch.randn(2, 3, 32, device=device)
    positions = torch.tensor([-1, 4, 9], device=device)
    run = lambda m: m(x, prefix_states=prefix, prefix_positions=positions)[0]
    assert_close("o", _compiled(layer)(x, prefix_states=prefix, prefix_positions=positions)[0], run(layer), TOL)
