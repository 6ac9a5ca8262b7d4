"""Update clipping (``max_update_norm``) in the linear family's Triton kernels: ``chunk_*`` and
``fused_recurrent_*`` keep every SPEC §1 promise against the float64 per-token reference with the
same bound (outputs, final states, gradients of q, k, v, alpha, eta, theta and the initial state;
continuation at any split, decoding token by token; packed sequences; gates at 0 and 1), a bound
that bites for every token gives exactly zero theta gradients, and a bound that never bites gives
the unclipped kernel's results bit for bit.

The clipped backward has two kernels: all of V in one block up to a ``[64, 64]`` state tile, and
beyond that the split kernel (V in sub-blocks, adjoints in global memory); the ``split_backward``
fixture forces the latter at small sizes (16-column sub-blocks), and one test runs it at
K = V = 128 as a real call would. The clipped forward likewise has a split kernel, for GPUs whose
shared memory does not take all of V in one block; ``split_forward`` forces it (every launch of
the single-block forward fails as on such a GPU).

The clip decision is a discontinuity of the gradient (``d theta' / d theta`` jumps from 1 to 0),
so a token whose write sits on the bound to within rounding would make any two correct
implementations disagree: drawn cases keep every token a relative margin away from the bound
(:mod:`titans_layers.testing.clipping`).
"""

import dataclasses
from unittest import mock

from triton.runtime.errors import OutOfResources

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import titans_layers.ops.momentum_delta_rule.chunk as chunk_module
import titans_layers.ops.momentum_delta_rule.naive as naive_module
from titans_layers.ops.common import triton_utils
from titans_layers.ops import chunk_momentum_delta_rule, fused_recurrent_momentum_delta_rule
from titans_layers.testing import (GATE_PATTERNS, assert_close, check_against_reference, check_continuation,
                                   check_deterministic, check_varlen, make_case, pin_gates, tolerance)
from titans_layers.testing.clipping import clear_of_the_bound, clip_ratios
from titans_layers.testing.compare import assert_identical, relative_error
from titans_layers.testing.contract import run_with_grads

f32, bf16 = torch.float32, torch.bfloat16
# op, chunk sizes, lengths drawn (odd ones cross chunks and tiles mid-way; the decode kernel walks
# token by token under the interpreter, so it gets shorter ones)
OPS = {"chunk": (chunk_momentum_delta_rule, (16, 32, 64), (1, 5, 16, 37, 64, 100)),
       # 1 and 3: the decode kernel's backward through naive_chunk; 16, 64: through the chunk kernels
       "fused_recurrent": (fused_recurrent_momentum_delta_rule, (1, 3, 16, 64), (1, 5, 16, 37, 53))}
# clips (nearly) every token with theta > 0, most, some, none (keys are unit-norm, |err| ~ sqrt(V))
BOUNDS = (1e-4, 0.05, 0.5, 1e3)


def with_bound(case, bound):
    return dataclasses.replace(case, extra={**case.extra, "max_update_norm": bound})


def gradients(impl, case, inputs, initial_state):
    """Gradients of q, k, v, the gates and the initial state under fixed random cotangents of o and
    the final state, the cotangent of o rounded to the input dtype (what a bf16 ``o`` passes back)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    init = [x.detach().clone().requires_grad_() for x in initial_state or ()]
    o, final = impl(*leaves, chunk_size=case.chunk_size, initial_state=tuple(init) or None, output_final_state=True,
                    cu_seqlens=case.cu_seqlens, **case.extra)
    gen = torch.Generator().manual_seed(case.seed)
    cotangent = lambda y, dtype: torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    loss = (o.double() * cotangent(o, case.dtype)).sum()
    for y in (final.M, final.S, final.anchor):
        loss = loss + (y.double() * cotangent(y, torch.float32)).sum()
    targets = leaves + init
    grads = torch.autograd.grad(loss, targets, allow_unused=True) if loss.requires_grad else [None] * len(targets)
    return dict(zip(["q", "k", "v", "alpha", "eta", "theta"] + [f"init{i}" for i in range(len(init))], grads))


def check_clipped(op, case):
    """:func:`check_against_reference`, with gradients held to a tolerance that knows their
    conditioning. With most writes clipped, dtheta is zero but at a few tokens, where it can be a
    cancelling sum compared alone (seen: dtheta at a theta = 0 token, the only unclipped one). Each
    gradient's sensitivity is measured on the reference: the relative change that rounding the
    cotangent of o to bf16 (relative 2^-9) makes, against the float64 (bf16 inputs) or float32
    (float32 inputs) cotangent the kernel gets. The kernel's own rounding moves an ill-conditioned
    gradient alike: tf32 dot operands (relative 2^-11, on every state and adjoint) about as much
    as that (the case above: 13% sensitivity, the kernel within 7%), full float32 at most 2^-9 of
    it. Each gradient is held to the larger of the tolerance and that."""
    check_against_reference(op, case, check_grads=False)
    inputs, init = [x.double() for x in case.inputs], [x.double() for x in case.initial_state or ()]
    ref = gradients(naive_module.naive_recurrent_momentum_delta_rule, case, inputs, init)
    perturbed = case.q.double() if case.dtype == bf16 else case.q.to(bf16)  # the other cotangent rounding
    other = gradients(naive_module.naive_recurrent_momentum_delta_rule, dataclasses.replace(case, q=perturbed),
                      inputs, init)
    scale = 1.0 if case.dtype == bf16 else 2.0 ** -9
    got = gradients(op, case, case.inputs, case.initial_state)
    tol = tolerance(case.dtype, case.q.device, "grad")
    for name, g in ref.items():
        if g is not None:
            assert got[name] is not None, f"no gradient reached {name}"
            assert_close(f"d{name}", got[name], g, max(tol, scale * relative_error(other[name], g)))


@st.composite
def clipped_cases(draw, chunk_sizes, lengths, device, varlen, values=st.integers(2, 16)):
    """Small heads (V drawn from ``values``), lengths from ``lengths`` (packed: pieces of up to 37),
    every state kind, gate extremes, fp32 and bf16, a bound from BOUNDS; ``varlen`` True (packed),
    False or None (either)."""
    dtype = draw(st.sampled_from([f32, bf16]))
    C = draw(st.sampled_from(chunk_sizes))
    H = draw(st.integers(1, 2))
    K, V = draw(st.integers(2, 16)), draw(values)
    packed = None
    if draw(st.booleans()) if varlen is None else varlen:
        packed = draw(st.lists(st.sampled_from([0, 1, 7, 16, 37]), min_size=1, max_size=3))
        B, T = 1, sum(packed)
    else:
        B, T = draw(st.integers(1, 2)), draw(st.sampled_from(lengths))
    case = make_case(seed=draw(st.integers(0, 2**31 - 1)), B=B, T=T, H=H, K=K, V=V, dtype=dtype, chunk_size=C,
                     extremes=draw(st.sampled_from([0.0, 0.1, 0.5])),
                     state=draw(st.sampled_from(["none", "M", "MS", "shared"])), lengths=packed,
                     split=draw(st.integers(0, T)), device=device)
    case = with_bound(case, draw(st.sampled_from(BOUNDS)))
    assume(clear_of_the_bound(case))
    return case


@pytest.mark.parametrize("name", list(OPS))
@given(data=st.data())
def test_clipped_kernel_matches_float64_reference(name, device, data):
    """Outputs, final states and all gradients equal the float64 reference with the same bound;
    then the state continues exactly at the case's split (mid-chunk included)."""
    op, chunk_sizes, lengths = OPS[name]
    case = data.draw(clipped_cases(chunk_sizes, lengths, device, varlen=False), label="case")
    check_clipped(op, case)
    check_continuation(op, case)
    if name == "chunk":  # a chunked prefill, then the decode kernel takes over
        check_continuation(op, case, continue_with=fused_recurrent_momentum_delta_rule)


@pytest.mark.parametrize("name", list(OPS))
@given(data=st.data())
def test_clipped_kernel_packed_sequences(name, device, data):
    """With cu_seqlens: against the reference (gradients included) and against separate runs."""
    op, chunk_sizes, lengths = OPS[name]
    case = data.draw(clipped_cases(chunk_sizes, lengths, device, varlen=True), label="case")
    check_clipped(op, case)
    check_varlen(op, case)


def _case(device, *, C=16, T=37, K=12, V=20, bound=0.5, dtype=f32, seed=5, state="MS", **kw):
    return with_bound(make_case(seed=seed, B=2, T=T, H=2, K=K, V=V, dtype=dtype, chunk_size=C, state=state,
                                device=device, **kw), bound)


@pytest.mark.parametrize("pattern", list(GATE_PATTERNS))
@pytest.mark.parametrize("name", list(OPS))
def test_clipped_gates_exactly_zero_or_one(name, pattern, device):
    """Gates at exactly 0 or 1 with a bound that clips some tokens: finite and exact."""
    case = _case(device, bound=0.3)
    case = pin_gates(case, **GATE_PATTERNS[pattern])
    check_against_reference(OPS[name][0], case)


@pytest.mark.parametrize("name", list(OPS))
def test_clipped_zero_keys_and_zero_errors(name, device):
    """Zero keys (||G|| = 0 with theta > 0) and a first chunk with zero errors (no initial state,
    zero values): never clipped, no 0/0 anywhere, gradients finite and exact."""
    case = _case(device, bound=0.05, state="none")
    case.k[:, ::3] = 0.0
    case.v[:, :16] = 0.0
    case.theta = case.theta.clamp(min=0.2)
    ratios = clip_ratios(case)
    assert (ratios == 0).any() and (ratios > 1).any()  # both regimes present
    check_against_reference(OPS[name][0], case)


@pytest.mark.parametrize("name", list(OPS))
def test_bound_biting_for_every_token(name, device):
    """Every token clipped: the writes no longer depend on theta, so d theta is exactly zero."""
    case = _case(device, bound=1e-4, extremes=0.0)
    case.theta = case.theta.clamp(min=0.05)
    assert (clip_ratios(case) > 10).all()
    check_against_reference(OPS[name][0], case)
    _, _, grads = run_with_grads(OPS[name][0], case, case.inputs, case.initial_state, case.seed)
    assert torch.count_nonzero(grads["theta"]) == 0


@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_bound_never_biting_is_the_unclipped_kernel_bit_for_bit(name, dtype, device):
    """No token clipped (V fits one block either way): outputs, states and every gradient equal
    the unclipped kernel's bit for bit."""
    op = OPS[name][0]
    case = _case(device, bound=1e3, dtype=dtype)
    assert (clip_ratios(case) < 0.1).all()
    clipped = run_with_grads(op, case, case.inputs, case.initial_state, case.seed)
    free = run_with_grads(op, with_bound(case, None), case.inputs, case.initial_state, case.seed)
    assert_identical("o", clipped[0], free[0])
    for field in ("M", "S", "anchor"):
        assert_identical(f"final_state.{field}", getattr(clipped[1], field), getattr(free[1], field))
    for key, g in free[2].items():
        assert_identical(f"d{key}", clipped[2][key], g)


@pytest.mark.parametrize("name", list(OPS))
def test_clipping_with_v_beyond_one_block(name, device):
    """V = 80: unclipped launches split V into blocks of 64, a clipped one must hold all of V to
    take the error norm (a per-block norm would clip with the wrong |err|)."""
    case = _case(device, K=8, V=80, T=21, bound=2.0)
    ratios = clip_ratios(case)
    assert (ratios > 1).any() and (ratios < 1).any()
    check_against_reference(OPS[name][0], case)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_clipped_prefill_then_token_by_token_decode(chunk_size, device):
    """A chunked prefill ending mid-chunk, then the decode kernel one token per call, equals one
    chunked call and the float64 reference."""
    case = _case(device, C=chunk_size, T=chunk_size + 11, K=8, V=12, bound=0.3)
    kw = dict(chunk_size=chunk_size, output_final_state=True, max_update_norm=0.3)
    prefill = chunk_size // 2 + 3
    o_full, st_full = chunk_momentum_delta_rule(*case.inputs, initial_state=case.initial_state, **kw)
    o, state = chunk_momentum_delta_rule(*(x[:, :prefill] for x in case.inputs), initial_state=case.initial_state,
                                         **kw)
    outs = [o]
    for t in range(prefill, case.q.shape[1]):
        o, state = fused_recurrent_momentum_delta_rule(*(x[:, t:t + 1] for x in case.inputs), initial_state=state,
                                                       **kw)
        outs.append(o)
    tol = tolerance(f32, device)
    assert_close("decoded outputs", torch.cat(outs, dim=1), o_full, tol)
    for field in ("M", "S", "anchor"):
        assert_close(f"decoded final {field}", getattr(state, field), getattr(st_full, field), tol)
    assert torch.equal(state.offset, st_full.offset)
    ref = naive_module.naive_recurrent_momentum_delta_rule(
        *(x.double() for x in case.inputs), chunk_size=chunk_size, output_final_state=True, max_update_norm=0.3,
        initial_state=tuple(x.double() for x in case.initial_state))
    assert_close("decoded outputs vs reference", torch.cat(outs, dim=1), ref[0], tol)
    assert_close("decoded final M vs reference", state.M, ref[1].M, tol)


def test_clipped_kernel_is_deterministic(device):
    """Bit-identical reruns (the decode op's backward is this one's)."""
    check_deterministic(chunk_momentum_delta_rule, _case(device, bound=0.3))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True])
@pytest.mark.parametrize("name", list(OPS))
def test_bad_bound_is_rejected(name, bad, device):
    case = _case(device, T=4)
    with pytest.raises(ValueError, match="max_update_norm"):
        OPS[name][0](*case.inputs, chunk_size=16, max_update_norm=bad)


class _Counted:
    """A Triton kernel whose launches are counted (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def split_backward(monkeypatch):
    """Every clipped backward through the split kernel, in sub-blocks of 16 columns of V (so V = 40
    walks 16 + 16 + 8); yields the launch counter."""
    counted = _Counted(chunk_module.chunk_momentum_delta_rule_bwd_split_kernel)
    block_sizes = chunk_module.block_sizes
    monkeypatch.setattr(chunk_module, "CLIP_BWD_MAX_TILE", 0)
    monkeypatch.setattr(chunk_module, "block_sizes", lambda K, V: (block_sizes(K, V)[0], 16))
    monkeypatch.setattr(chunk_module, "chunk_momentum_delta_rule_bwd_split_kernel", counted)
    return counted


@given(data=st.data())
def test_split_backward_matches_float64_reference(split_backward, device, data):
    """The split backward's gradients (V in 1 to 3 sub-blocks, the last one partial)."""
    case = data.draw(clipped_cases(*OPS["chunk"][1:], device, varlen=None, values=st.sampled_from([5, 16, 40])),
                     label="case")
    launches = split_backward.launches
    check_clipped(chunk_momentum_delta_rule, case)
    assert split_backward.launches == launches + 1


@pytest.mark.parametrize("pattern", ["alpha = 1 (erase)", "eta = 1, alpha = 0 (no decay)", "all gates 0",
                                     "all gates 1"])
def test_split_backward_gates_exactly_zero_or_one(split_backward, pattern, device):
    case = _case(device, V=40, bound=0.3)
    case = pin_gates(case, **GATE_PATTERNS[pattern])
    check_against_reference(chunk_momentum_delta_rule, case)
    assert split_backward.launches == 1


def test_split_backward_bound_biting_for_every_token(split_backward, device):
    case = _case(device, V=40, bound=1e-4, extremes=0.0)
    case.theta = case.theta.clamp(min=0.05)
    assert (clip_ratios(case) > 10).all()
    _, _, grads = run_with_grads(chunk_momentum_delta_rule, case, case.inputs, case.initial_state, case.seed)
    assert torch.count_nonzero(grads["theta"]) == 0
    check_against_reference(chunk_momentum_delta_rule, case)
    assert split_backward.launches == 2


class _NoRoom:
    """A kernel whose every launch fails as on a GPU without the shared memory it needs."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise OutOfResources(128 << 10, 99 << 10, "shared memory")
        return launch


@pytest.fixture
def split_forward(monkeypatch):
    """Every clipped forward through the split kernel (the single-block one never fits), in
    sub-blocks of 16 columns of V; yields the launch counter."""
    counted = _Counted(chunk_module.chunk_momentum_delta_rule_fwd_split_kernel)
    block_sizes = chunk_module.block_sizes
    monkeypatch.setattr(triton_utils, "_FIRST_FIT", {})
    monkeypatch.setattr(chunk_module, "block_sizes", lambda K, V: (block_sizes(K, V)[0], 16))
    monkeypatch.setattr(chunk_module, "chunk_momentum_delta_rule_fwd_kernel", _NoRoom())
    monkeypatch.setattr(chunk_module, "chunk_momentum_delta_rule_fwd_split_kernel", counted)
    return counted


@given(data=st.data())
def test_split_forward_matches_float64_reference(split_forward, device, data):
    """The split forward's outputs, final states and (through the backward, which reads the norms
    it stored) gradients, V in 1 to 3 sub-blocks, the last one partial; then the state it hands on
    (mid-chunk anchors included) continues exactly at the case's split."""
    case = data.draw(clipped_cases(*OPS["chunk"][1:], device, varlen=False, values=st.sampled_from([5, 16, 40])),
                     label="case")
    launches = split_forward.launches
    check_clipped(chunk_momentum_delta_rule, case)
    check_continuation(chunk_momentum_delta_rule, case)
    assert split_forward.launches > launches


@pytest.mark.parametrize("pattern", ["alpha = 1 (erase)", "eta = 1, alpha = 0 (no decay)", "all gates 0",
                                     "all gates 1"])
def test_split_forward_gates_exactly_zero_or_one(split_forward, pattern, device):
    case = pin_gates(_case(device, V=40, bound=0.3), **GATE_PATTERNS[pattern])
    check_against_reference(chunk_momentum_delta_rule, case)
    assert split_forward.launches == 1


def test_split_forward_packed_sequences(split_forward, device):
    """Packed sequences, each starting from its own state, through the split forward."""
    case = with_bound(make_case(seed=12, B=1, T=90, H=2, K=16, V=40, dtype=f32, chunk_size=32, state="MS",
                                lengths=[7, 50, 33], device=device), 0.3)
    assert clear_of_the_bound(case)
    ratios = clip_ratios(case)
    assert (ratios > 1).any() and (ratios < 1).any()
    check_against_reference(chunk_momentum_delta_rule, case)
    check_varlen(chunk_momentum_delta_rule, case)
    assert split_forward.launches > 0


@pytest.mark.parametrize("name", list(OPS))
def test_clipping_at_the_largest_heads(name, device):
    """K = V = 128 as the launchers take it: the forward in one [128, 128] block, the backward in
    the split kernel (4 sub-blocks of 32 columns)."""
    case = with_bound(make_case(seed=11, B=1, T=21, H=1, K=128, V=128, dtype=f32, chunk_size=16, state="MS",
                                device=device), 2.0)
    ratios = clip_ratios(case)
    assert (ratios > 1).any() and (ratios < 1).any()
    counted = _Counted(chunk_module.chunk_momentum_delta_rule_bwd_split_kernel)
    with mock.patch.object(chunk_module, "chunk_momentum_delta_rule_bwd_split_kernel", counted):
        check_against_reference(OPS[name][0], case)
    assert counted.launches == 1
