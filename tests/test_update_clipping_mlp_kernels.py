"""Update clipping (``max_update_norm``) in the MLP family's Triton kernels, ``chunk_mlp_memory`` and
``fused_recurrent_mlp_memory``: against the float64 clipped per-token reference (outputs, final
states, every gradient), at any split point, packed, at gates of exactly 0 and 1, and bit-identical
to the unclipped kernels when the bound never bites. Drawn cases keep every token's write clear of
the bound, where the gradient jumps (:mod:`titans_layers.testing.clipping`). (Clipped chunked
prefill then token-by-token decoding: ``tests/test_mlp_memory.py``.)"""

import dataclasses

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from titans_layers.ops.mlp_memory import chunk_mlp_memory, fused_recurrent_mlp_memory, naive_recurrent_mlp_memory
from titans_layers.testing import (check_against_reference, check_continuation, check_deterministic,
                                   check_varlen, make_case, op_cases, pin_gates, relative_error, tolerance)
from titans_layers.testing.clipping import clear_of_the_bound
from titans_layers.testing.contract import run_with_grads

bf16, f32, f64 = torch.bfloat16, torch.float32, torch.float64

# short cases (the kernels run under the interpreter on CPU) that still cross tiles, chunks and Dh blocks
KERNELS = {
    "chunk": (chunk_mlp_memory, dict(dtypes=(f32, bf16), chunk_sizes=(16, 32, 64), max_T=80, max_dim=16)),
    "fused_recurrent": (fused_recurrent_mlp_memory, dict(dtypes=(f32, bf16), chunk_sizes=(1, 3, 16), max_T=30,
                                                         max_dim=12)),
}
# The cases' writes have norms theta * |G| of about 1e-3 to 0.1: 1e-4 clips nearly every token with
# theta > 0, 0.01 about half, 1.0 none.
BOUNDS = (1e-4, 3e-3, 0.01, 1.0)


@st.composite
def clipped_cases(draw, name, device, varlen):
    """A drawn case with a drawn bound, every token's write clear of it (the clip decision is a
    discontinuity of the gradient: :mod:`titans_layers.testing.clipping`)."""
    case = draw(op_cases(family="mlp", varlen=varlen, device=device, **KERNELS[name][1]))
    case = dataclasses.replace(case, extra={**case.extra, "max_update_norm": draw(st.sampled_from(BOUNDS))})
    assume(clear_of_the_bound(case))
    return case


@pytest.mark.parametrize("name", list(KERNELS))
@given(data=st.data())
def test_clipped_kernels_match_the_float64_reference(name, device, data):
    case = data.draw(clipped_cases(name, device, varlen=None), label="case")
    check_against_reference(KERNELS[name][0], case)


@pytest.mark.parametrize("name", list(KERNELS))
@given(data=st.data())
def test_clipped_state_continuation_at_any_split(name, device, data):
    check_continuation(KERNELS[name][0], data.draw(clipped_cases(name, device, varlen=False), label="case"))


@pytest.mark.parametrize("name", list(KERNELS))
@given(data=st.data())
def test_clipped_packed_sequences_equal_separate_runs(name, device, data):
    check_varlen(KERNELS[name][0], data.draw(clipped_cases(name, device, varlen=True), label="case"))


@pytest.mark.parametrize("name", list(KERNELS))
def test_clipped_kernels_are_bitwise_deterministic(name, device):
    case = make_case(seed=8, B=2, T=27, H=2, K=8, V=8, dtype=bf16, chunk_size=16, state="MS", family="mlp",
                     hidden=20, device=device)
    check_deterministic(KERNELS[name][0], dataclasses.replace(case, extra={**case.extra, "max_update_norm": 3e-3}))


@pytest.mark.parametrize("gates", [dict(alpha=1.0), dict(eta=1.0, alpha=0.0), dict(eta=0.0), dict(theta=0.0),
                                   dict(theta=1.0), dict(alpha=0.0, eta=0.0, theta=0.0)], ids=str)
@pytest.mark.parametrize("name", list(KERNELS))
def test_clipped_gates_exactly_zero_or_one(name, gates, device):
    """theta = 0 (a zero step: never clipped, no 0 / 0), theta = 1 (every write clipped), and the
    forget and momentum gates at their ends."""
    case = make_case(seed=4, B=2, T=23, H=2, K=8, V=8, dtype=f32, chunk_size=16, state="MS", family="mlp",
                     hidden=16, activation="gelu", residual=True, device=device)
    case = pin_gates(case, **gates)
    check_against_reference(KERNELS[name][0], dataclasses.replace(case, extra={**case.extra, "max_update_norm": 0.01}))


def _run(op, case, bound, dtype=None):
    """Outputs, final-state fields and input gradients of ``op`` on ``case`` (cast to ``dtype``)."""
    inputs = [x.to(dtype) if dtype else x for x in case.inputs]
    state = tuple(x.to(dtype) if dtype else x for x in case.initial_state)
    o, final, grads = run_with_grads(op, case, inputs, state, cotangent_seed=1, max_update_norm=bound)
    return [o, final.W1, final.W2, final.S1, final.S2, *grads.values()]


@pytest.mark.parametrize("name", list(KERNELS))
def test_the_bound_bites_and_a_loose_one_changes_nothing(name, device):
    """With a bound above every write the clipped kernels are the unclipped ones bit for bit; with
    a tight one their outputs and gradients move far beyond the tolerance, toward the clipped
    float64 reference."""
    op = KERNELS[name][0]
    case = make_case(seed=6, B=2, T=35, H=2, K=12, V=12, dtype=f32, chunk_size=16, state="MS", family="mlp",
                     hidden=24, device=device)
    free = _run(op, case, None)
    for x, y in zip(_run(op, case, 1e6), free):
        assert torch.equal(x, y)
    tight = _run(op, case, 1e-3)
    reference = _run(naive_recurrent_mlp_memory, case, 1e-3, dtype=f64)
    for i, (x, y, ref) in enumerate(zip(tight, free, reference)):
        tol = tolerance(f32, device, "grad" if i >= 5 else "output")
        assert relative_error(x, ref) <= tol, i
        assert relative_error(y, ref) > 100 * tol, i  # without the bound the result is far off


@pytest.mark.parametrize("op", [chunk_mlp_memory, fused_recurrent_mlp_memory], ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_a_bad_bound_is_named(op, bad, device):
    case = make_case(seed=0, B=1, T=4, H=1, K=4, V=4, dtype=f32, chunk_size=16, state="M", family="mlp",
                     device=device)
    with pytest.raises(ValueError, match="max_update_norm"):
        op(*case.inputs, chunk_size=16, initial_state=case.initial_state, max_update_norm=bad, **case.extra)
