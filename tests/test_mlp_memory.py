"""SPEC §1 promises for the MLP-memory implementations, against the float64 per-token reference
(whose per-token gradients come from autograd of the loss, independently of the dual form)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from titans_layers.ops.mlp_memory import MLPMemoryState, naive_chunk_mlp_memory, naive_recurrent_mlp_memory
from titans_layers.testing import (check_against_reference, check_continuation, check_deterministic, check_errors,
                                   check_varlen, make_case, op_cases)

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

IMPLS = {
    "naive_recurrent": (naive_recurrent_mlp_memory, dict(dtypes=(f32, bf16), chunk_sizes=(1, 3, 16), max_T=40,
                                                         max_dim=16)),
    "naive_chunk": (naive_chunk_mlp_memory, dict(dtypes=(f64, f32, bf16, f16), chunk_sizes=(1, 2, 3, 5, 16, 64),
                                                 max_T=100, max_dim=24)),
}
NAMES = list(IMPLS)


def cases(name, device, varlen):
    return op_cases(family="mlp", varlen=varlen, device=device, **IMPLS[name][1])


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_matches_float64_reference(name, device, data):
    """Promises 2, 4, 5: outputs, all state fields, gradients of every input and initial weight."""
    check_against_reference(IMPLS[name][0], data.draw(cases(name, device, varlen=None), label="case"))


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_state_continuation_at_any_split(name, device, data):
    check_continuation(IMPLS[name][0], data.draw(cases(name, device, varlen=False), label="case"))


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_packed_sequences_equal_separate_runs(name, device, data):
    check_varlen(IMPLS[name][0], data.draw(cases(name, device, varlen=True), label="case"))


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_bitwise_deterministic(name, device, data):
    check_deterministic(IMPLS[name][0], data.draw(cases(name, device, varlen=None), label="case"))


@pytest.mark.parametrize("name", NAMES)
def test_malformed_calls_raise_clear_errors(name, device):
    check_errors(IMPLS[name][0], device, family="mlp")


@pytest.mark.parametrize("gates", [dict(alpha=1.0), dict(eta=1.0, alpha=0.0), dict(eta=0.0), dict(theta=0.0),
                                   dict(alpha=0.0, eta=0.0, theta=0.0)], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("name", NAMES)
def test_gates_exactly_zero_or_one(name, activation, gates, device):
    C = IMPLS[name][1]["chunk_sizes"][-1]
    case = make_case(seed=4, B=2, T=C + 7, H=2, K=8, V=8, dtype=f32, chunk_size=C, state="MS", family="mlp",
                     hidden=16, activation=activation, residual=True, device=device)
    for gate, value in gates.items():
        setattr(case, gate, torch.full_like(getattr(case, gate), value))
    check_against_reference(IMPLS[name][0], case)


def test_learned_initial_memory_gets_summed_gradients(device):
    """Initial weights with a leading dim of 1 are shared by every sequence and get their gradients summed."""
    case = make_case(seed=2, B=3, T=20, H=2, K=6, V=5, dtype=f32, chunk_size=4, state="shared", family="mlp",
                     hidden=12, device=device)
    W1, W2 = (x.clone().requires_grad_() for x in case.initial_state)
    o, _ = naive_chunk_mlp_memory(*case.inputs, chunk_size=4, initial_state=(W1, W2))
    gW1, = torch.autograd.grad(o.sum(), W1)
    per_row = sum(torch.autograd.grad(naive_chunk_mlp_memory(*(x[b:b + 1] for x in case.inputs), chunk_size=4,
                                                             initial_state=(W1, W2))[0].sum(), W1)[0]
                  for b in range(3))
    assert gW1.shape == W1.shape
    torch.testing.assert_close(gW1, per_row, rtol=1e-5, atol=1e-6)


def test_final_state_is_named_and_float32(device):
    case = make_case(seed=0, B=2, T=9, H=1, K=4, V=3, dtype=bf16, chunk_size=4, family="mlp", hidden=6, device=device)
    o, state = naive_chunk_mlp_memory(*case.inputs, chunk_size=4, initial_state=case.initial_state,
                                      output_final_state=True)
    assert isinstance(state, MLPMemoryState) and o.dtype == bf16
    assert state.W1.shape == (2, 1, 4, 6) and state.W2.shape == (2, 1, 6, 3)
    assert all(getattr(state, f).dtype == f32 for f in ("W1", "W2", "S1", "S2", "anchor1", "anchor2"))
    assert state.offset.tolist() == [1, 1] and state.chunk_size == 4
