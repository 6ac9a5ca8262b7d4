"""SPEC §1 promises for every implementation of the linear-memory update, against the float64
per-token reference (``titans_layers.testing`` holds the checks; these tests draw the cases)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from titans_layers.ops import (chunk_momentum_delta_rule, fused_recurrent_momentum_delta_rule,
                               naive_chunk_momentum_delta_rule, naive_recurrent_momentum_delta_rule)
from titans_layers.testing import (GATE_PATTERNS, assert_close, check_against_reference, check_continuation,
                                   check_deterministic, check_errors, check_varlen, make_case, op_cases, pin_gates,
                                   tolerance)

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# implementation -> what it takes: dtypes, chunk sizes, longest T drawn (kernels run under the
# interpreter on CPU, so their cases stay short but still cross several chunks and tiles)
IMPLS = {
    "naive_recurrent": (naive_recurrent_momentum_delta_rule, dict(dtypes=(f32, bf16), chunk_sizes=(1, 3, 16),
                                                                  max_T=60)),
    "naive_chunk": (naive_chunk_momentum_delta_rule, dict(dtypes=(f64, f32, bf16, f16),
                                                          chunk_sizes=(1, 2, 3, 5, 16, 64), max_T=100)),
    "chunk": (chunk_momentum_delta_rule, dict(dtypes=(f32, bf16, f16), chunk_sizes=(16, 32, 64), max_T=150)),
    "fused_recurrent": (fused_recurrent_momentum_delta_rule, dict(dtypes=(f32, bf16, f16),
                                                                  chunk_sizes=(1, 3, 16, 64), max_T=100)),
}
NAMES = list(IMPLS)


def cases(name, device, varlen):
    opts = IMPLS[name][1]
    return op_cases(dtypes=opts["dtypes"], chunk_sizes=opts["chunk_sizes"], max_T=opts["max_T"], varlen=varlen,
                    device=device)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_matches_float64_reference(name, device, data):
    """Promises 2, 4, 5: outputs, final states and gradients of every input and of the initial state."""
    case = data.draw(cases(name, device, varlen=None), label="case")
    check_against_reference(IMPLS[name][0], case)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_state_continuation_at_any_split(name, device, data):
    """Promise 1: 1..T equals 1..s then s+1..T from the returned state, mid-chunk included."""
    case = data.draw(cases(name, device, varlen=False), label="case")
    check_continuation(IMPLS[name][0], case)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_packed_sequences_equal_separate_runs(name, device, data):
    """Promise 3: with cu_seqlens each sequence equals running it alone."""
    case = data.draw(cases(name, device, varlen=True), label="case")
    check_varlen(IMPLS[name][0], case)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_bitwise_deterministic(name, device, data):
    """Promise 7: same inputs, bit-identical outputs and gradients."""
    case = data.draw(cases(name, device, varlen=None), label="case")
    check_deterministic(IMPLS[name][0], case)


@pytest.mark.parametrize("name", NAMES)
def test_malformed_calls_raise_clear_errors(name, device):
    """Promise 6: bad shapes, dtypes, cu_seqlens, chunk sizes and states raise ValueError/TypeError."""
    check_errors(IMPLS[name][0], device)


@pytest.mark.parametrize("pattern", list(GATE_PATTERNS))
@pytest.mark.parametrize("name", NAMES)
def test_gates_exactly_zero_or_one(name, pattern, device):
    """Promise 4: gates at exactly 0 or 1 everywhere stay finite and exact, gradients included."""
    dtype = torch.float32
    C = IMPLS[name][1]["chunk_sizes"][-1]
    case = make_case(seed=7, B=2, T=2 * C + 5, H=2, K=12, V=20, dtype=dtype, chunk_size=C, state="MS",
                     device=device)
    case = pin_gates(case, **GATE_PATTERNS[pattern])
    check_against_reference(IMPLS[name][0], case)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_prefill_then_token_by_token_decode(chunk_size, device):
    """Decoding one token per call with fused_recurrent after a chunked prefill equals one chunked call."""
    case = make_case(seed=3, B=2, T=chunk_size + 21, H=2, K=16, V=24, dtype=torch.float32, chunk_size=chunk_size,
                     state="MS", device=device)
    prefill = chunk_size // 2 + 3  # ends mid-chunk
    kw = dict(chunk_size=chunk_size, output_final_state=True)
    o_full, st_full = chunk_momentum_delta_rule(*case.inputs, initial_state=case.initial_state, **kw)
    outs = []
    o, state = chunk_momentum_delta_rule(*(x[:, :prefill] for x in case.inputs), initial_state=case.initial_state,
                                         **kw)
    outs.append(o)
    for t in range(prefill, case.q.shape[1]):
        o, state = fused_recurrent_momentum_delta_rule(*(x[:, t:t + 1] for x in case.inputs), initial_state=state,
                                                       **kw)
        outs.append(o)
    tol = tolerance(torch.float32, device)
    assert_close("decoded outputs", torch.cat(outs, dim=1), o_full, tol)
    assert_close("decoded final M", state.M, st_full.M, tol)
    assert torch.equal(state.offset, st_full.offset)


def test_kernels_reject_unsupported_chunk_sizes_and_dims(device):
    case = make_case(seed=0, B=1, T=8, H=1, K=4, V=4, dtype=torch.float32, chunk_size=16, device=device)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_momentum_delta_rule(*case.inputs, chunk_size=8)
    big = make_case(seed=0, B=1, T=4, H=1, K=130, V=4, dtype=torch.float32, chunk_size=16, device=device)
    for op in (chunk_momentum_delta_rule, fused_recurrent_momentum_delta_rule):
        with pytest.raises(ValueError, match="K = 130"):
            op(*big.inputs, chunk_size=16)
    with pytest.raises(TypeError, match="float64"):
        chunk_momentum_delta_rule(*(x.double() for x in case.inputs), chunk_size=16)


def test_mid_chunk_state_needs_its_chunk_size(device):
    case = make_case(seed=0, B=1, T=20, H=1, K=4, V=4, dtype=torch.float32, chunk_size=16, device=device)
    _, state = naive_chunk_momentum_delta_rule(*case.inputs, chunk_size=16, output_final_state=True)
    assert state.offset.tolist() == [4]
    with pytest.raises(ValueError, match="chunk_size = 16"):
        naive_chunk_momentum_delta_rule(*case.inputs, chunk_size=32, initial_state=state)
