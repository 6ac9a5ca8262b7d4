"""Per-step update clipping (``max_update_norm``): the clipped ops still keep every SPEC §1
promise against the float64 reference, each write obeys the bound, and a layer fed 100K
adversarial high-norm tokens keeps its memory bounded (and without clipping does not)."""

import dataclasses
import math

import pytest
import torch
from fla.models.utils import Cache
from hypothesis import assume, given
from hypothesis import strategies as st

from titans_layers.modules import NeuralMemory
from titans_layers.ops import (chunk_momentum_delta_rule, fused_recurrent_momentum_delta_rule, naive_chunk_mlp_memory,
                               naive_chunk_momentum_delta_rule, naive_recurrent_mlp_memory,
                               naive_recurrent_momentum_delta_rule)
from titans_layers.testing import check_against_reference, check_continuation, make_case, relative_error
from titans_layers.testing.clipping import clear_of_the_bound

IMPLS = {"linear": (naive_recurrent_momentum_delta_rule, naive_chunk_momentum_delta_rule),
         "mlp": (naive_recurrent_mlp_memory, naive_chunk_mlp_memory)}


@st.composite
def clipped_cases(draw, family, device):
    C = draw(st.sampled_from([1, 3, 4, 16]))
    T = draw(st.integers(1, 40))
    case = make_case(seed=draw(st.integers(0, 2**31 - 1)), B=draw(st.integers(1, 2)), T=T, H=2, K=8, V=8,
                     dtype=draw(st.sampled_from([torch.float32, torch.float64])), chunk_size=C,
                     state=draw(st.sampled_from(["M", "MS", "shared"])), family=family, device=device,
                     split=draw(st.integers(0, T)))
    bound = draw(st.sampled_from([1e-3, 0.02, 0.2, 5.0]))
    case = dataclasses.replace(case, extra={**case.extra, "max_update_norm": bound})
    assume(clear_of_the_bound(case))  # the clip decision is a kink of the gradient (testing.clipping)
    return case


@pytest.mark.parametrize("family", list(IMPLS))
@given(data=st.data())
def test_clipped_chunk_form_matches_reference(family, device, data):
    """The dual form clips with ||G|| = |k| |err| (and the MLP's two rank-one factors); the
    reference takes the norm of the full per-token gradient: outputs, states, all gradients."""
    case = data.draw(clipped_cases(family, device), label="case")
    check_against_reference(IMPLS[family][1], case)
    check_continuation(IMPLS[family][1], case)


@pytest.mark.parametrize("family", list(IMPLS))
def test_clipping_changes_the_update_and_bounds_each_write(family, device):
    """Token by token (C = 1, eta = 0 so S_t is exactly the write): ||S_t|| <= c always, and
    the bound really bites (the unclipped run writes more and its outputs differ)."""
    case = make_case(seed=7, B=2, T=30, H=2, K=8, V=8, dtype=torch.float64, chunk_size=1, state="MS",
                     family=family, device=device)
    case = dataclasses.replace(case, eta=torch.zeros_like(case.eta), theta=torch.full_like(case.theta, 0.05))
    op = IMPLS[family][1]
    c = 0.01
    state, writes, unclipped_writes = case.initial_state, [], []
    for t in range(case.q.shape[1]):
        step = [x[:, t:t + 1] for x in case.inputs]
        _, clipped = op(*step, chunk_size=1, initial_state=state, output_final_state=True, max_update_norm=c,
                        **case.extra)
        _, free = op(*step, chunk_size=1, initial_state=state, output_final_state=True, **case.extra)
        momenta = [clipped.S] if family == "linear" else [clipped.S1, clipped.S2]
        free_momenta = [free.S] if family == "linear" else [free.S1, free.S2]
        writes.append(torch.cat([m.flatten(-2) for m in momenta], -1).norm(dim=-1).max().item())
        unclipped_writes.append(torch.cat([m.flatten(-2) for m in free_momenta], -1).norm(dim=-1).max().item())
        state = clipped
    assert max(writes) <= c * (1 + 1e-9), writes
    assert max(unclipped_writes) > 2 * c
    o_clipped, _ = op(*case.inputs, chunk_size=1, initial_state=case.initial_state, max_update_norm=c, **case.extra)
    o_free, _ = op(*case.inputs, chunk_size=1, initial_state=case.initial_state, **case.extra)
    assert relative_error(o_clipped, o_free) > 1e-3


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), 1e39, "1", True])
def test_bad_bound_is_rejected(bad, device):
    case = make_case(seed=0, B=1, T=4, H=1, K=4, V=4, dtype=torch.float32, chunk_size=2, device=device)
    with pytest.raises(ValueError, match="max_update_norm"):
        naive_chunk_momentum_delta_rule(*case.inputs, chunk_size=2, max_update_norm=bad)
    with pytest.raises(ValueError, match="max_update_norm"):
        NeuralMemory(16, 2, max_update_norm=bad)


@pytest.mark.parametrize("op", [chunk_momentum_delta_rule, fused_recurrent_momentum_delta_rule])
def test_triton_ops_name_a_bad_bound(op, device):
    case = make_case(seed=0, B=1, T=4, H=1, K=16, V=16, dtype=torch.float32, chunk_size=16, device=device)
    with pytest.raises(ValueError, match="max_update_norm"):
        op(*case.inputs, chunk_size=16, max_update_norm=-1.0)


def _memory_norm(state, memory: str) -> float:
    """Largest per-head Frobenius norm of the memory weights (both MLP layers together)."""
    weights = [state.M] if memory == "linear" else [state.W1, state.W2]
    return torch.cat([w.flatten(-2) for w in weights], -1).norm(dim=-1).max().item()


def _stream(layer: NeuralMemory, n_tokens: int, scale: float, block: int = 5000) -> list[float]:
    """Feed ``n_tokens`` random tokens of norm ~ ``scale * sqrt(D)`` through the layer with its
    cache (decoding-style state passing, no gradients); the memory norm after each block."""
    gen = torch.Generator().manual_seed(1)
    cache, norms = Cache(), []
    with torch.no_grad():
        for _ in range(n_tokens // block):
            x = scale * torch.randn(1, block, layer.hidden_size, generator=gen)
            layer(x.to(layer.o_proj.weight.device), past_key_values=cache, use_cache=True)
            norms.append(_memory_norm(cache[0]["recurrent_state"], layer.memory))
    return norms


def _fixed_gate_layer(memory: str, clip, device) -> NeuralMemory:
    """A layer whose gates ignore the input (alpha = 0.01, eta = 0.9, theta = max_step_size / 2),
    so the stream probes the memory update itself rather than gate saturation."""
    torch.manual_seed(0)
    layer = NeuralMemory(32, 2, memory=memory, chunk_size=16, max_update_norm=clip, layer_idx=0).to(device)
    for proj in (layer.alpha_proj, layer.eta_proj, layer.theta_proj):
        torch.nn.init.zeros_(proj.weight)
    return layer


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_memory_stays_bounded_under_100k_adversarial_tokens(memory, device):
    """With clipping: ||S|| <= c / (1 - eta) and ||W|| <= max(||W_0||, c / ((1 - eta) alpha))
    for every one of 100K tokens of norm ~1e3 (c / ((1 - eta) alpha) = 1 here: c = 1e-3, eta = 0.9,
    alpha = 0.01). Without: the linear memory follows the huge values far past that bound, the MLP
    memory diverges to inf/NaN."""
    c, scale = 1e-3, 1e3
    layer = _fixed_gate_layer(memory, c, device)
    alpha = torch.sigmoid(layer.alpha_proj.bias).min().item()
    eta = torch.sigmoid(layer.eta_proj.bias).max().item()
    w0 = torch.cat([w.flatten(-2) for w in layer.initial_state()], -1).norm(dim=-1).max().item()
    bound = max(w0, c / ((1 - eta) * alpha)) * (1 + 1e-4)
    clipped = _stream(layer, 100_000, scale)
    assert all(math.isfinite(n) and n <= bound for n in clipped), (bound, clipped)

    free = _stream(_fixed_gate_layer(memory, None, device), 100_000, scale)
    assert not all(math.isfinite(n) and n <= bound for n in free), (bound, free)
