"""Context parallelism of the memory ops (titans_layers.distributed): every mode against one process.

One spawned gloo group per world size runs every check (spawning costs more than the checks); each
check compares outputs, final states (true final states, and the state at a slice edge for a
sequence that goes on) and the gradients of every input and of the initial state with the op run
on the whole packed batch in one process, float32, relative error <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed_helpers import raised_message, rel_err, run_group

TOL = 1e-5
# (world size, global cu_seqlens): sequences that start and end inside slices, span 2 or 3 slices,
# slice edges inside chunks (chunk 4 and 5), and an edge on a sequence boundary
LAYOUTS = {2: [[0, 3, 17, 24], [0, 12, 20, 24], [0, 24]], 3: [[0, 5, 30, 36], [0, 2, 7, 36], [0, 12, 13, 36]]}
H, K, V, DH = 6, 8, 8, 16


def _inputs(T: int, seed: int, family: str, N: int, H=H, K=K, V=V, DH=DH):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    u = lambda *s: torch.rand(*s, generator=g)
    q = torch.nn.functional.normalize(r(1, T, H, K), dim=-1)
    k = torch.nn.functional.normalize(r(1, T, H, K), dim=-1)
    v = r(1, T, H, V)
    step = 0.5 if family == "linear" else 0.1
    alpha, eta, theta = 0.1 * u(1, T, H), 0.5 + 0.5 * u(1, T, H), step * u(1, T, H)
    if family == "linear":
        init = (0.3 * r(N, H, K, V), 0.1 * r(N, H, K, V))
    else:
        init = (r(1, H, K, DH) / K ** 0.5, 0.3 * r(1, H, DH, V) / DH ** 0.5)
    return [q, k, v, alpha, eta, theta], list(init)


def _fields(state):
    return [t for t in state if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _check(op_name: str, mode: str, C: int, cu: list, seed: int, extra: dict, dims=None) -> dict:
    import titans_layers.ops as ops
    from titans_layers.distributed import build_cp_context, context_parallel_update

    op = getattr(ops, op_name)
    family = "linear" if "momentum" in op_name else "mlp"
    T, N = cu[-1], len(cu) - 1
    extra = dict(extra)
    state_init = extra.pop("state_init", False)  # a state mid-chunk (offsets and anchors) for every sequence
    inputs, init = _inputs(T, seed, family, N, **(dims or {}))
    make_init = tuple
    if state_init:
        g0 = torch.Generator().manual_seed(seed + 2)
        offsets = torch.randint(0, C, (N,), generator=g0)
        shapes = [init[0].shape] if family == "linear" else [init[0].shape, init[1].shape] * 2
        init = init + [0.1 * torch.randn(shape, generator=g0) for shape in shapes]
        if family == "linear":  # (M, S, anchor)
            make_init = lambda t: ops.MomentumDeltaRuleState(*t, offset=offsets, chunk_size=C)  # noqa: E731
        else:  # (W1, W2, S1, S2, anchor1 = W1 + noise, anchor2)
            make_init = lambda t: ops.MLPMemoryState(t[0], t[1], t[2], t[3], t[0] + 0.1 * t[4], t[1] + 0.1 * t[5],  # noqa: E731
                                                     offset=offsets, chunk_size=C)
    g = torch.Generator().manual_seed(seed + 1)
    w_o = torch.randn(inputs[2].shape, generator=g)
    cu_t = torch.tensor(cu)

    # one process, the whole batch
    ref_in = [x.clone().requires_grad_() for x in inputs + init]
    o_ref, fs_ref = op(*ref_in[:6], chunk_size=C, initial_state=make_init(ref_in[6:]), output_final_state=True,
                       cu_seqlens=cu_t, **extra)
    f_ref = _fields(fs_ref)
    w_f = [torch.randn(f.shape, generator=g) for f in f_ref]
    loss = (o_ref * w_o).sum() + sum((f * w).sum() for f, w in zip(f_ref, w_f))
    grads_ref = torch.autograd.grad(loss, ref_in)

    # context parallel
    cp = build_cp_context(cu_t, None)
    s, e = cp.start, cp.end
    local = [x[:, s:e].clone().requires_grad_() for x in inputs]
    init_cp = [x.clone().requires_grad_() for x in init]
    o, fs = context_parallel_update(op, *local, cp_context=cp, mode=mode, chunk_size=C,
                                    initial_state=make_init(init_cp), output_final_state=True, **extra)
    ids = list(cp.seq_ids)
    ends_here = [i for i, sid in enumerate(ids) if cu[sid + 1] <= e]  # rows whose sequence ends in this slice
    fl = _fields(fs)
    loss = (o * w_o[:, s:e]).sum() + sum((f[ends_here] * w[[ids[i] for i in ends_here]]).sum()
                                         for f, w in zip(fl, w_f))
    loss.backward()
    errs = {"o": rel_err(o.detach(), o_ref.detach()[:, s:e])}
    # final states of sequences ending here; the state at the right edge of one that goes on
    if ends_here:
        errs["final"] = max(rel_err(f.detach()[ends_here], fr.detach()[[ids[i] for i in ends_here]])
                            for f, fr in zip(fl, f_ref))
    if cp.continues_right and mode != "heads":
        cut = torch.tensor([c for c in cu if c < e] + [e])
        n_cut = len(cut) - 1
        init_cut = tuple(x[:n_cut] if x.shape[0] > 1 else x for x in init)
        if state_init:
            init_cut = make_init(init_cut)._replace(offset=offsets[:n_cut])
        _, fs_cut = op(*[x[:, :e] for x in inputs], chunk_size=C, initial_state=init_cut, output_final_state=True,
                       cu_seqlens=cut, **extra)
        errs["edge_state"] = max(rel_err(f.detach()[-1], fc[-1]) for f, fc in zip(fl, _fields(fs_cut)))
        errs["edge_offset"] = float(int(fs.offset[-1]) != int(fs_cut.offset[-1]))
    # gradients: input slices gathered, initial state summed over ranks
    for name, x, gr in zip("q k v alpha eta theta".split(), local, grads_ref[:6]):
        pieces = [torch.empty_like(x.grad) for _ in range(cp.world_size)]
        dist.all_gather(pieces, x.grad)
        errs[f"d{name}"] = rel_err(torch.cat(pieces, dim=1), gr)
    for i, (x, gr) in enumerate(zip(init_cp, grads_ref[6:])):
        gsum = x.grad.clone()
        dist.all_reduce(gsum)
        errs[f"dinit{i}"] = rel_err(gsum, gr)
    return errs


CASES = [  # (op, mode, chunk size, options)
    ("naive_chunk_momentum_delta_rule", "parallel", 4, {}),
    ("naive_chunk_momentum_delta_rule", "parallel", 5, {}),
    ("naive_chunk_momentum_delta_rule", "sequential", 4, {"max_update_norm": 0.05}),
    ("naive_chunk_momentum_delta_rule", "heads", 4, {}),
    ("naive_recurrent_momentum_delta_rule", "parallel", 3, {}),
    ("naive_chunk_mlp_memory", "sequential", 4, {}),
    ("naive_chunk_momentum_delta_rule", "parallel", 4, {"state_init": True}),
    ("naive_chunk_mlp_memory", "sequential", 5, {"state_init": True, "activation": "gelu"}),
    ("naive_chunk_mlp_memory", "heads", 5, {"activation": "gelu"}),
]


def _max_over_ranks(errs: dict, world_size: int) -> dict:
    """Each error's largest value over the ranks (ranks may report different keys: a rank with no
    sequence crossing its right edge has no edge state)."""
    gathered = [None] * world_size
    dist.all_gather_object(gathered, errs)
    merged = {}
    for d in gathered:
        for k, v in d.items():
            merged[k] = max(merged.get(k, 0.0), v)
    return merged


# the Triton kernels (under TRITON_INTERPRET=1 without a GPU): 2 ranks, the first layout, chunk 16
# (the slice edge at 12 falls inside the first chunk of a sequence that began at 3)
KERNEL_CASES = [
    ("chunk_momentum_delta_rule", "parallel", 16, {}),
    ("chunk_mlp_memory", "sequential", 16, {}),
]
KERNEL_DIMS = dict(H=2, K=16, V=16, DH=32)


def _all_checks(rank, world_size):
    torch.manual_seed(0)
    results = {}
    if world_size == 2:
        cu = LAYOUTS[2][0]
        for ci, (op_name, mode, C, extra) in enumerate(KERNEL_CASES):
            errs = _check(op_name, mode, C, cu, seed=50 + ci, extra=extra, dims=KERNEL_DIMS)
            results[(op_name, mode, C, str(extra), tuple(cu))] = _max_over_ranks(errs, world_size)
    for li, cu in enumerate(LAYOUTS[world_size]):
        for ci, (op_name, mode, C, extra) in enumerate(CASES):
            errs = _check(op_name, mode, C, cu, seed=100 * li + ci, extra=extra)
            results[(op_name, mode, C, str(extra), tuple(cu))] = _max_over_ranks(errs, world_size)
    results["bad"] = _bad_contexts(rank, world_size)
    return results


def _bad_contexts(rank, world_size):
    """Each bad context raises a clear error; returns the messages."""
    from titans_layers.distributed import build_cp_context, context_parallel_update
    from titans_layers.ops import naive_chunk_momentum_delta_rule as op
    msgs = {}

    def expect(name, exc, fn):
        msgs[name] = raised_message(name, fn, exc)

    expect("indivisible", ValueError, lambda: build_cp_context(torch.tensor([0, 5, 3 * world_size + 1])))
    expect("not_start_0", ValueError, lambda: build_cp_context(torch.tensor([1, 6])))
    expect("decreasing", ValueError, lambda: build_cp_context(torch.tensor([0, 8, 4, 6 * world_size])))
    expect("float", TypeError, lambda: build_cp_context(torch.tensor([0.0, 6.0])))
    # ranks that pass their local offsets instead of the global ones
    expect("mismatched", ValueError, lambda: build_cp_context(torch.tensor([0, 2 + rank, 6 * world_size])))
    cp = build_cp_context(torch.tensor([0, 3, 6 * world_size]))
    x = torch.randn(1, 5, 2, 4)  # not this rank's 6 tokens
    gates = torch.rand(1, 5, 2)
    expect("slice_length", ValueError, lambda: context_parallel_update(op, x, x, x, gates, gates, gates, cp_context=cp))
    expect("not_a_context", TypeError, lambda: context_parallel_update(op, x, x, x, gates, gates, gates,
                                                                     cp_context={"start": 0}))
    y, gy = torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2)
    expect("cu_seqlens_given", ValueError, lambda: context_parallel_update(
        op, y, y, y, gy, gy, gy, cp_context=cp, cu_seqlens=torch.tensor([0, 6])))
    expect("bad_mode", ValueError, lambda: context_parallel_update(op, y, y, y, gy, gy, gy, cp_context=cp, mode="x"))
    expect("parallel_clip", ValueError, lambda: context_parallel_update(
        op, y, y, y, gy, gy, gy, cp_context=cp, mode="parallel", max_update_norm=1.0))
    y3, g3 = torch.randn(1, 6, 3 if world_size == 2 else 2, 4), torch.rand(1, 6, 3 if world_size == 2 else 2)
    expect("heads_indivisible", ValueError, lambda: context_parallel_update(op, y3, y3, y3, g3, g3, g3,
                                                                          cp_context=cp, mode="heads"))
    expect("not_an_op", TypeError, lambda: context_parallel_update(torch.add, y, y, y, gy, gy, gy, cp_context=cp))
    if world_size == 2:  # a context built for another group: rank 0 alone
        sub = dist.new_group([0])
        if rank == 0:
            other = build_cp_context(torch.tensor([0, 4]), group=sub)
            expect("wrong_group_rank", ValueError,
                   lambda: context_parallel_update(op, *[t[:, :4] for t in (y, y, y)], *[t[:, :4] for t in (gy, gy, gy)],
                                                   cp_context=other.__class__(**{**other.__dict__, "rank": 1})))
    return msgs


@pytest.fixture(scope="module", params=[2, 3])
def results(request):
    return request.param, run_group(request.param, _all_checks)


def test_every_mode_equals_one_process(results):
    world_size, res = results
    failures = []
    for key, errs in res.items():
        if key == "bad":
            continue
        for name, err in errs.items():
            if not err <= TOL:
                failures.append(f"{key} {name}: {err:.2e}")
    assert not failures, "\n".join(failures)
    # the edge checks ran (sequences cross slice edges in these layouts)
    assert any("edge_state" in errs for key, errs in res.items() if key != "bad")


def test_bad_contexts_raise_clear_errors(results):
    world_size, res = results
    msgs = res["bad"]
    assert "multiple of the group size" in msgs["indivisible"]
    assert "start at 0" in msgs["not_start_0"]
    assert "never decrease" in msgs["decreasing"]
    assert "integer" in msgs["float"]
    assert "same on every rank" in msgs["mismatched"]
    assert "this rank's slice" in msgs["slice_length"]
    assert "CPContext" in msgs["not_a_context"]
    assert "cu_seqlens" in msgs["cu_seqlens_given"]
    assert "mode" in msgs["bad_mode"]
    assert "max_update_norm" in msgs["parallel_clip"]
    assert "divisible" in msgs["heads_indivisible"]
    assert "titans_layers.ops" in msgs["not_an_op"]
    if world_size == 2:
        assert "built for rank 1" in msgs["wrong_group_rank"]
