"""The SPEC §1 contract as reusable checks: hold any implementation of a memory update (ours,
or a kernel you wrote) to the same promises as the references.

Each ``check_*`` takes an implementation ``impl(q, k, v, alpha, eta, theta, *, chunk_size,
initial_state, output_final_state, cu_seqlens, **options) -> (o, final_state)`` and one
:class:`OpCase` (whose ``family`` picks the reference and the state fields, and whose ``extra``
holds the options), and raises an AssertionError naming what broke.
:func:`verify_momentum_delta_rule` and :func:`verify_mlp_memory` run them all under Hypothesis.
"""

from __future__ import annotations

from typing import Callable

import torch

from titans_layers.ops.mlp_memory import MLPMemoryState, naive_recurrent_mlp_memory
from titans_layers.ops.momentum_delta_rule import MomentumDeltaRuleState, naive_recurrent_momentum_delta_rule
from titans_layers.testing.cases import OpCase
from titans_layers.testing.compare import assert_close, assert_identical, tolerance

Impl = Callable[..., tuple]
INPUT_NAMES = ("q", "k", "v", "alpha", "eta", "theta")
# family -> (float64 per-token reference, the state's tensor fields)
FAMILIES = {
    "linear": (naive_recurrent_momentum_delta_rule, ("M", "S", "anchor")),
    "mlp": (naive_recurrent_mlp_memory, ("W1", "W2", "S1", "S2", "anchor1", "anchor2")),
}


def state_fields(case: OpCase) -> tuple[str, ...]:
    return FAMILIES[case.family][1]


def run_with_grads(impl: Impl, case: OpCase, inputs, initial_state, cotangent_seed: int, **kwargs):
    """Run ``impl`` and backpropagate fixed random cotangents of o and of every final-state tensor.

    Returns ``(o, final_state, grads)`` with grads a dict over the input names and ``init{i}``
    for each initial-state tensor (None where no gradient flowed).
    """
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    init = None if initial_state is None else tuple(x.detach().clone().requires_grad_() for x in initial_state)
    o, final = impl(*leaves, chunk_size=case.chunk_size, initial_state=init, output_final_state=True,
                    cu_seqlens=case.cu_seqlens, **case.extra, **kwargs)
    gen = torch.Generator().manual_seed(cotangent_seed)
    loss = 0.0
    state_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    for y, dtype in [(o, case.dtype)] + [(getattr(final, name), state_dtype) for name in state_fields(case)]:
        # each cotangent is drawn in the dtype the implementation under test gets it in (o's is the
        # input dtype; states are float32), so the float64 reference receives the very same values
        # and not the unrounded ones: a rounded do would be an error of the harness, not of the op
        cotangent = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).double()
        loss = loss + (y.double() * cotangent.to(y.device)).sum()
    targets = leaves + (list(init) if init is not None else [])
    grads = torch.autograd.grad(loss, targets, allow_unused=True) if loss.requires_grad else [None] * len(targets)
    names = list(INPUT_NAMES) + [f"init{i}" for i in range(len(targets) - len(leaves))]
    final = final._replace(**{name: getattr(final, name).detach() for name in state_fields(case)})
    return o.detach(), final, dict(zip(names, grads))


def _float64(case: OpCase):
    inputs = tuple(x.detach().double() for x in case.inputs)
    init = None if case.initial_state is None else tuple(x.double() for x in case.initial_state)
    return inputs, init


def check_against_reference(impl: Impl, case: OpCase, *, check_grads: bool = True) -> dict:
    """Promises 2, 4, 5: outputs, final states and all input gradients equal the float64
    per-token reference run on the same (dtype-rounded) inputs; everything finite; o in the input
    dtype and states in float32. Returns the measured relative errors by name."""
    ref_inputs, ref_init = _float64(case)
    seed = case.seed + 1
    ref_o, ref_s, ref_g = run_with_grads(FAMILIES[case.family][0], case, ref_inputs, ref_init, seed)
    if check_grads:
        o, s, g = run_with_grads(impl, case, case.inputs, case.initial_state, seed)
    else:
        with torch.no_grad():
            o, s = impl(*case.inputs, chunk_size=case.chunk_size, initial_state=case.initial_state,
                        output_final_state=True, cu_seqlens=case.cu_seqlens, **case.extra)
    device = case.q.device
    if o.dtype != case.dtype:
        raise AssertionError(f"o has dtype {o.dtype}, expected the input dtype {case.dtype}")
    expected_state_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    errors = {}
    tol_out = tolerance(case.dtype, device, "output")
    errors["o"] = assert_close("o", o, ref_o, tol_out)
    for name in state_fields(case):
        x = getattr(s, name)
        if x.dtype != expected_state_dtype:
            raise AssertionError(f"final_state.{name} has dtype {x.dtype}, expected {expected_state_dtype}")
        errors[name] = assert_close(f"final_state.{name}", x, getattr(ref_s, name), tol_out)
    if not torch.equal(s.offset.cpu(), ref_s.offset.cpu()):
        raise AssertionError(f"final_state.offset {s.offset.tolist()} != reference {ref_s.offset.tolist()}")
    if check_grads:
        tol_grad = tolerance(case.dtype, device, "grad")
        for name, ref in ref_g.items():
            if ref is None:
                continue
            if g[name] is None:
                raise AssertionError(f"no gradient reached {name}")
            if g[name].dtype != (case.dtype if name in INPUT_NAMES else g[name].dtype):
                raise AssertionError(f"d{name} has dtype {g[name].dtype}, expected {case.dtype}")
            errors[f"d{name}"] = assert_close(f"d{name}", g[name], ref, tol_grad)
    return errors


def check_continuation(impl: Impl, case: OpCase, *, continue_with: Impl | None = None) -> None:
    """Promise 1: positions 1..T in one call equal 1..s then s+1..T with the returned state, at
    the case's split point s (mid-chunk included). ``continue_with`` runs the second part
    (default: ``impl``), e.g. a decode kernel after a chunked prefill."""
    if case.cu_seqlens is not None:
        raise ValueError("check_continuation takes unpacked cases (cu_seqlens=None)")
    second = continue_with or impl
    s = case.split
    kw = dict(chunk_size=case.chunk_size, output_final_state=True, **case.extra)
    with torch.no_grad():
        o_full, st_full = impl(*case.inputs, initial_state=case.initial_state, **kw)
        o1, st1 = impl(*(x[:, :s] for x in case.inputs), initial_state=case.initial_state, **kw)
        o2, st2 = second(*(x[:, s:] for x in case.inputs), initial_state=st1, **kw)
    tol = tolerance(case.dtype, case.q.device, "output")
    assert_close(f"o after splitting at {s}", torch.cat([o1, o2], dim=1), o_full, tol)
    for name in state_fields(case):
        assert_close(f"final_state.{name} after splitting at {s}", getattr(st2, name), getattr(st_full, name), tol)
    if not torch.equal(st2.offset.cpu(), st_full.offset.cpu()):
        raise AssertionError(f"final offset after splitting at {s}: {st2.offset.tolist()} != {st_full.offset.tolist()}")


def check_varlen(impl: Impl, case: OpCase) -> None:
    """Promise 3: with ``cu_seqlens`` each packed sequence equals running it alone. The packed call
    gets ``cu_seqlens`` as a strided (non-contiguous) view, which an implementation must read as
    its values, not as a contiguous buffer."""
    if case.cu_seqlens is None:
        raise ValueError("check_varlen takes packed cases (cu_seqlens given)")
    kw = dict(chunk_size=case.chunk_size, output_final_state=True, **case.extra)
    strided = case.cu_seqlens.repeat_interleave(2)[::2]  # [N + 1], stride 2
    with torch.no_grad():
        o, st = impl(*case.inputs, initial_state=case.initial_state, cu_seqlens=strided, **kw)
    tol = tolerance(case.dtype, case.q.device, "output")
    bounds = case.cu_seqlens.tolist()
    for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None
        if case.initial_state is not None:
            init = tuple(x[i:i + 1] if x.shape[0] > 1 else x for x in case.initial_state)
        with torch.no_grad():
            o_i, st_i = impl(*(x[:, bos:eos] for x in case.inputs), initial_state=init, **kw)
        if eos > bos:
            assert_close(f"o of packed sequence {i}", o[:, bos:eos], o_i, tol)
        for name in state_fields(case):
            assert_close(f"final_state.{name} of packed sequence {i}", getattr(st, name)[i:i + 1],
                         getattr(st_i, name), tol)


def check_deterministic(impl: Impl, case: OpCase) -> None:
    """Promise 7: the same inputs give bit-identical outputs, states and gradients."""
    runs = [run_with_grads(impl, case, case.inputs, case.initial_state, case.seed) for _ in range(2)]
    (o1, s1, g1), (o2, s2, g2) = runs
    assert_identical("o", o1, o2)
    for name in state_fields(case):
        assert_identical(f"final_state.{name}", getattr(s1, name), getattr(s2, name))
    for name in g1:
        if g1[name] is not None:
            assert_identical(f"d{name}", g1[name], g2[name])


def malformed_calls(device="cpu", family: str = "linear") -> list[tuple[str, dict, type]]:
    """Promise 6: (description, keyword arguments, expected exception type) for bad calls."""
    B, T, H, K, V = 2, 8, 2, 4, 6
    f = dict(dtype=torch.float32, device=device)
    if family == "linear":
        state = {}
        bad_states = [
            ("initial M of wrong shape", (torch.zeros(B, H, K + 1, V, **f),), ValueError),
            ("initial M with 3 rows for B = 2", (torch.zeros(3, H, K, V, **f),), ValueError),
            ("initial_state of 3 tensors", (torch.zeros(B, H, K, V, **f),) * 3, ValueError),
            ("initial_state not a tuple", torch.zeros(B, H, K, V, **f), TypeError),
        ]
        M = torch.zeros(B, H, K, V, **f)
        weights = (M, M, M)  # M, S, anchor
    else:
        Dh = 5
        W1, W2 = torch.zeros(1, H, K, Dh, **f), torch.zeros(1, H, Dh, V, **f)
        state = dict(initial_state=(W1, W2))
        bad_states = [
            ("no initial weights", None, ValueError),
            ("W2 with another hidden width", (W1, torch.zeros(1, H, Dh + 1, V, **f)), ValueError),
            ("W1 with 3 rows for B = 2", (torch.zeros(3, H, K, Dh, **f), W2), ValueError),
            ("initial_state of 3 tensors", (W1, W2, W1), ValueError),
            ("initial_state not a tuple", W1, TypeError),
            ("W1 with hidden width 0", (W1[..., :0], W2[:, :, :0]), ValueError),
        ]
        weights = (W1, W2, W1, W2, W1, W2)  # W1, W2, S1, S2, anchor1, anchor2
    state_class = MomentumDeltaRuleState if family == "linear" else MLPMemoryState

    def full(offset, chunk_size):  # a state object with these two fields
        return state_class(*weights, offset, chunk_size)

    zero = torch.zeros(B, dtype=torch.long, device=device)
    bad_states += [
        ("state chunk_size a string", full(zero, "16"), ValueError),
        ("state chunk_size 0", full(zero, 0), ValueError),
        ("state chunk_size a bool", full(zero, True), ValueError),
        ("state offset of dtype bool", full(torch.zeros(B, dtype=torch.bool, device=device), 16), ValueError),
    ]

    def good(batch=B, **over):
        args = dict(q=torch.randn(batch, T, H, K, **f), k=torch.randn(batch, T, H, K, **f),
                    v=torch.randn(batch, T, H, V, **f), alpha=torch.rand(batch, T, H, **f),
                    eta=torch.rand(batch, T, H, **f), theta=torch.rand(batch, T, H, **f), **state)
        args.update(over)
        return args

    calls = [
        ("q of rank 3", good(q=torch.randn(B, T, H * K, **f)), ValueError),
        ("k shaped unlike q", good(k=torch.randn(B, T, H, K + 1, **f)), ValueError),
        ("v with another T", good(v=torch.randn(B, T + 1, H, V, **f)), ValueError),
        ("alpha with a trailing dim", good(alpha=torch.rand(B, T, H, 1, **f)), ValueError),
        ("eta broadcastable but not [B, T, H]", good(eta=torch.rand(1, T, H, **f)), ValueError),
        ("theta with another H", good(theta=torch.rand(B, T, H + 1, **f)), ValueError),
        ("integer q", good(q=torch.ones(B, T, H, K, dtype=torch.long, device=device)), TypeError),
        ("q and k of different dtypes", good(k=torch.randn(B, T, H, K, dtype=torch.float16, device=device)),
         TypeError),
        ("q not a tensor", good(q=[[0.0]]), TypeError),
        ("batch size 0", good(0), ValueError),
        ("max_update_norm beyond float32", good(max_update_norm=1e39), ValueError),
        ("chunk_size 0", good(chunk_size=0), ValueError),
        ("chunk_size not an int", good(chunk_size=2.0), TypeError),
        ("cu_seqlens with B > 1", good(cu_seqlens=torch.tensor([0, T], device=device)), ValueError),
        ("cu_seqlens float", good(1, cu_seqlens=torch.tensor([0.0, T], **f)), TypeError),
        ("cu_seqlens 2-D", good(1, cu_seqlens=torch.tensor([[0, T]], device=device)), TypeError),
        ("cu_seqlens not from 0", good(1, cu_seqlens=torch.tensor([1, T], device=device)), ValueError),
        ("cu_seqlens decreasing", good(1, cu_seqlens=torch.tensor([0, 5, 3, T], device=device)), ValueError),
        ("cu_seqlens not ending at T", good(1, cu_seqlens=torch.tensor([0, T - 1], device=device)), ValueError),
    ]
    calls += [(what, good(initial_state=st), exc) for what, st, exc in bad_states]
    if family == "mlp":
        calls += [
            ("unknown activation", good(activation="relu"), ValueError),
            ("residual with K != V", good(residual=True), ValueError),
        ]
    return calls


def check_errors(impl: Impl, device="cpu", family: str = "linear") -> None:
    """Promise 6: every malformed call raises the expected ValueError/TypeError naming an argument."""
    for what, kwargs, exc in malformed_calls(device, family):
        args = [kwargs.pop(n) for n in INPUT_NAMES]
        try:
            impl(*args, **kwargs)
        except exc as e:
            if "`" not in str(e):
                raise AssertionError(f"{what}: the {exc.__name__} does not name the argument: {e}") from e
        except Exception as e:  # noqa: BLE001 - any other type is the failure being tested for
            raise AssertionError(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}") from e
        else:
            raise AssertionError(f"{what}: expected {exc.__name__}, but the call succeeded")


def verify_op(impl: Impl, *, family: str, dtypes=(torch.float32,), chunk_sizes=(16,), device="cpu",
              max_examples: int = 20, max_T: int = 80, max_dim: int = 40, continue_with: Impl | None = None,
              check_errors_too: bool = True) -> None:
    """Check ``impl`` of op ``family`` ("linear" or "mlp") against every SPEC §1 promise on
    ``max_examples`` Hypothesis cases per promise."""
    from hypothesis import HealthCheck, given, settings

    from titans_layers.testing.strategies import op_cases

    cfg = settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))
    draw = dict(dtypes=dtypes, chunk_sizes=chunk_sizes, max_T=max_T, max_dim=max_dim, family=family, device=device)

    @cfg
    @given(op_cases(varlen=None, **draw))
    def reference(case):
        check_against_reference(impl, case)

    @cfg
    @given(op_cases(varlen=False, **draw))
    def continuation(case):
        check_continuation(impl, case, continue_with=continue_with)

    @cfg
    @given(op_cases(varlen=True, **draw))
    def varlen(case):
        check_varlen(impl, case)

    @settings(cfg, max_examples=max(1, max_examples // 4))
    @given(op_cases(varlen=None, **draw))
    def deterministic(case):
        check_deterministic(impl, case)

    for prop in (reference, continuation, varlen, deterministic):
        prop()
    if check_errors_too:
        check_errors(impl, device, family)


def verify_momentum_delta_rule(impl: Impl, **kwargs) -> None:
    """:func:`verify_op` for the linear memory. Example, for a kernel of your own::

        from titans_layers.testing import verify_momentum_delta_rule
        verify_momentum_delta_rule(my_kernel, dtypes=(torch.float32, torch.bfloat16),
                                   chunk_sizes=(16, 32, 64), device="cuda")
    """
    verify_op(impl, family="linear", **kwargs)


def verify_mlp_memory(impl: Impl, **kwargs) -> None:
    """:func:`verify_op` for the MLP memory (draws the hidden width, activation and residual too)."""
    verify_op(impl, family="mlp", **kwargs)
