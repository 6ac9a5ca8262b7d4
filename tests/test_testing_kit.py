"""The contract checks must fail on broken implementations (a check that cannot fail is a defect)."""

import dataclasses

import pytest
import torch

from titans_layers.ops import (MomentumDeltaRuleState, naive_chunk_momentum_delta_rule,
                               naive_recurrent_momentum_delta_rule)
from titans_layers.testing import (check_against_reference, check_continuation, check_deterministic, check_errors,
                                   check_varlen, make_case, relative_error)
from titans_layers.testing.clipping import clear_of_the_bound, clip_ratios


def case(**over):
    args = dict(seed=1, B=2, T=29, H=2, K=8, V=12, dtype=torch.float32, chunk_size=8, state="MS", split=13)
    args.update(over)
    return make_case(**args)


def off_by_a_little(*args, **kw):
    o, s = naive_chunk_momentum_delta_rule(*args, **kw)
    return o * (1 + 1e-3), s


def forgets_one_output(*args, **kw):
    o, s = naive_chunk_momentum_delta_rule(*args, **kw)
    out = torch.empty_like(o)  # NaN-poisoned by conftest
    out[:, :-1] = o[:, :-1]
    return out, s


def drops_the_anchor(*args, initial_state=None, **kw):
    if isinstance(initial_state, MomentumDeltaRuleState):  # restarts at a chunk boundary
        initial_state = (initial_state.M, initial_state.S)
    return naive_chunk_momentum_delta_rule(*args, initial_state=initial_state, **kw)


def ignores_cu_seqlens(*args, cu_seqlens=None, initial_state=None, **kw):
    if initial_state is not None:
        initial_state = tuple(x[:1] for x in initial_state)
    o, s = naive_chunk_momentum_delta_rule(*args, initial_state=initial_state, **kw)
    n = 1 if cu_seqlens is None else len(cu_seqlens) - 1
    return o, s._replace(M=s.M.expand(n, -1, -1, -1), S=s.S.expand(n, -1, -1, -1),
                         anchor=s.anchor.expand(n, -1, -1, -1), offset=s.offset.expand(n))


def noisy(*args, **kw):
    o, s = naive_chunk_momentum_delta_rule(*args, **kw)
    return o + 1e-7 * torch.randn_like(o), s


def wrong_gate_gradient(*args, **kw):
    q, k, v, alpha, eta, theta = args
    eta = eta + (eta - eta.detach()) * 0.01  # same value, gradient 1.01x
    return naive_chunk_momentum_delta_rule(q, k, v, alpha, eta, theta, **kw)


def returns_float32(*args, **kw):
    o, s = naive_chunk_momentum_delta_rule(*args, **kw)
    return o.float(), s


def float64_then_rounded(*args, initial_state=None, **kw):
    """The float64 reference itself, with o returned in the input dtype and states in float32."""
    init = None if initial_state is None else tuple(x.double() for x in initial_state)
    o, s = naive_recurrent_momentum_delta_rule(*(x.double() for x in args), initial_state=init, **kw)
    return o.to(args[0].dtype), s._replace(M=s.M.float(), S=s.S.float(), anchor=s.anchor.float())


def accepts_anything(*args, **kw):
    return args[2], None


def test_reference_check_catches_wrong_values():
    with pytest.raises(AssertionError, match="^o:"):
        check_against_reference(off_by_a_little, case())


def test_reference_check_catches_unwritten_outputs():
    with pytest.raises(AssertionError, match="o: relative error inf"):
        check_against_reference(forgets_one_output, case())


def test_reference_check_catches_wrong_gradients():
    with pytest.raises(AssertionError, match="deta"):
        check_against_reference(wrong_gate_gradient, case())


def test_reference_check_catches_the_wrong_output_dtype():
    with pytest.raises(AssertionError, match="dtype"):
        check_against_reference(returns_float32, case(dtype=torch.bfloat16))


def test_reference_check_does_not_charge_the_op_for_rounding_its_cotangent():
    # T = 1: dq = theta * k * (do . v), a 7-term sum that cancels to 1e-4 of its terms. A do drawn
    # in float64 and rounded to bf16 on its way into the op moved dq by 600% (the harness's error,
    # not the op's); the cotangent must reach both sides with the same values.
    errors = check_against_reference(float64_then_rounded, case(seed=23, B=1, T=1, H=1, K=20, V=7, split=0,
                                                                 dtype=torch.bfloat16, state="none"))
    assert errors["dq"] < 1e-2


def test_relative_error_measures_underflowed_float16_against_its_smallest_normal():
    # a memory erased to the MLP's zero fixed point reads ~1e-9: float16 holds only zeros there
    reference = torch.full((4, 8), 6e-9, dtype=torch.float64)
    assert relative_error(reference.half(), reference) < 1e-3
    assert relative_error(torch.full((4, 8), 6e-5).half(), reference) > 0.9  # a wrong value still fails
    assert relative_error(reference.float(), reference) < 1e-6  # float32 holds it: relative as ever
    assert relative_error(torch.zeros(4, 8), reference) == 1.0
    assert relative_error(torch.full((2,), 1e-3), torch.zeros(2, dtype=torch.float64)) > 1e-3  # absolute at 0


def test_continuation_check_catches_a_dropped_anchor():
    with pytest.raises(AssertionError, match="splitting at 13"):
        check_continuation(drops_the_anchor, case())


def test_varlen_check_catches_leaking_sequences():
    with pytest.raises(AssertionError, match="packed sequence"):
        check_varlen(ignores_cu_seqlens, case(B=1, T=30, lengths=[10, 20], state="none"))


def test_determinism_check_catches_noise():
    with pytest.raises(AssertionError, match="differ"):
        check_deterministic(noisy, case())


def test_error_check_catches_silent_acceptance():
    with pytest.raises(AssertionError, match="succeeded"):
        check_errors(accepts_anything)


def test_uninitialised_memory_is_poisoned():
    assert torch.isnan(torch.empty(3)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2))).all()
    assert torch.isnan(torch.zeros(1).new_empty(4)).all()


@pytest.mark.parametrize("family", ["linear", "mlp"])
def test_clear_of_the_bound_rejects_a_write_on_the_bound(family, device):
    """With the bound at the largest write norm nothing is clipped, so that token sits exactly on
    the bound (ratio 1) and the case is rejected; a bound 10x larger leaves every write clear."""
    drawn = make_case(seed=3, B=1, T=20, H=1, K=8, V=8, dtype=torch.bfloat16, chunk_size=4, family=family,
                     device=device)
    with_bound = lambda c: dataclasses.replace(drawn, extra={**drawn.extra, "max_update_norm": c})  # noqa: E731
    largest = clip_ratios(with_bound(1e6)).max().item() * 1e6  # the largest write norm (nothing clipped)
    on_it = clip_ratios(with_bound(largest))
    assert (on_it - 1).abs().min().item() < 1e-12 and not clear_of_the_bound(with_bound(largest))
    assert clear_of_the_bound(with_bound(10 * largest))
