"""SPEC §1 promises for the MLP-memory implementations, against the float64 per-token reference
(whose per-token gradients come from autograd of the loss, independently of the dual form)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from titans_layers.ops.mlp_memory import chunk as chunk_module
from titans_layers.ops.mlp_memory import dual_form
from titans_layers.ops.mlp_memory.activations import ACTIVATIONS, act, act_derivatives
from titans_layers.ops.mlp_memory import fused_recurrent as fused_recurrent_module
from titans_layers.ops.mlp_memory import (MLPMemoryState, chunk_mlp_memory, fused_recurrent_mlp_memory,
                                         naive_chunk_mlp_memory, naive_recurrent_mlp_memory)
from titans_layers.testing import (assert_close, check_against_reference, check_continuation, check_deterministic,
                                   check_errors, check_varlen, make_case, op_cases, pin_gates, tolerance)

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def _two_chunk_blocks(op, *args, **kwargs):
    """``op`` with the dual form's blocks cut to two chunks (the default fits a test's whole
    sequence in one block); the backward keeps the forward's blocks."""
    saved, dual_form._block_chunks = dual_form._block_chunks, lambda NC, *sizes: min(NC, 2)
    try:
        return op(*args, **kwargs)
    finally:
        dual_form._block_chunks = saved


IMPLS = {
    "naive_recurrent": (naive_recurrent_mlp_memory, dict(dtypes=(f32, bf16), chunk_sizes=(1, 3, 16), max_T=40,
                                                         max_dim=16)),
    "naive_chunk": (naive_chunk_mlp_memory, dict(dtypes=(f64, f32, bf16, f16), chunk_sizes=(1, 2, 3, 5, 16, 64),
                                                 max_T=100, max_dim=24)),
    # the dual form in blocks of two chunks: the forward reads (and, without gradients, keeps) two
    # chunks' states at a time, the backward recomputes them from each block's first one
    "naive_chunk_blocks": (lambda *a, **kw: _two_chunk_blocks(naive_chunk_mlp_memory, *a, **kw),
                           dict(dtypes=(f64, f32, bf16), chunk_sizes=(1, 3, 16), max_T=60, max_dim=16)),
    # the Triton kernels run under the interpreter on CPU: short cases that still cross tiles,
    # chunks and (hidden widths up to 2 * max_dim > 16) several Dh blocks
    "chunk": (chunk_mlp_memory, dict(dtypes=(f32, bf16, f16), chunk_sizes=(16, 32, 64), max_T=80, max_dim=16)),
    "fused_recurrent": (fused_recurrent_mlp_memory, dict(dtypes=(f32, bf16, f16), chunk_sizes=(1, 3, 16, 64),
                                                         max_T=30, max_dim=12)),
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
    case = pin_gates(case, **gates)
    check_against_reference(IMPLS[name][0], case)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives_match_autograd(activation):
    """The dual form's backward takes act, act' and act'' from act_derivatives: held to autograd's
    first and second derivatives of the activation, in float64, out to where they saturate."""
    z = torch.linspace(-12, 12, 2001, dtype=f64, requires_grad=True)
    h = act(z, activation)
    (d1,) = torch.autograd.grad(h.sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z)
    for got, want in zip(act_derivatives(z.detach(), activation), (h, d1, d2)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)


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


@pytest.mark.parametrize("residual", [False, True])
def test_dual_form_without_grad_reads_a_chunk_at_a_time(monkeypatch, residual, device):
    """Without gradients the dual form keeps the states of only a block of chunks; with blocks of a
    single chunk it still equals the float64 reference, continuing from a mid-chunk state, with
    rows that end in different blocks, mid-chunk and on a chunk boundary (final anchors included)."""
    monkeypatch.setattr(dual_form, "_BLOCK_BYTES", 1)  # every block is one chunk
    case = make_case(seed=5, B=1, T=41, H=2, K=6, V=6, dtype=f64, chunk_size=4, state="MS", lengths=[9, 22, 10],
                     family="mlp", hidden=10, residual=residual, device=device)
    kw = dict(chunk_size=4, output_final_state=True, cu_seqlens=case.cu_seqlens, **case.extra)
    with torch.no_grad():
        _, mid = naive_recurrent_mlp_memory(*case.inputs, initial_state=case.initial_state, **kw)  # offsets 1, 2, 2
        o, state = naive_chunk_mlp_memory(*case.inputs, initial_state=mid, **kw)
        ref_o, ref_state = naive_recurrent_mlp_memory(*case.inputs, initial_state=mid, **kw)
    assert state.offset.tolist() == [2, 0, 0]  # the second row ends on the last chunk's boundary
    assert_close("o", o, ref_o, 1e-10)
    for name in ("W1", "W2", "S1", "S2", "anchor1", "anchor2"):
        assert_close(f"final {name}", getattr(state, name), getattr(ref_state, name), 1e-10)


@pytest.mark.parametrize("max_update_norm", [None, 0.02])
def test_dual_form_gradients_do_not_depend_on_its_blocks(monkeypatch, max_update_norm, device):
    """The backward recomputes each block's chunk-start states from the block's first one: with
    blocks of 1, 2 and 3 chunks (the last one short) it gives what one block of every chunk does,
    outputs and every gradient to float64 rounding, over rows that end in different blocks and an
    initial state that starts mid-chunk; clipped or not."""
    case = make_case(seed=11, B=1, T=41, H=2, K=6, V=6, dtype=f64, chunk_size=4, state="MS", lengths=[9, 22, 10],
                     family="mlp", hidden=7, residual=True, device=device)
    kw = dict(chunk_size=4, output_final_state=True, cu_seqlens=case.cu_seqlens, max_update_norm=max_update_norm,
              **case.extra)
    with torch.no_grad():
        _, mid = naive_recurrent_mlp_memory(*case.inputs, initial_state=case.initial_state, **kw)
    leaves = [x.detach().clone().requires_grad_() for x in (*case.inputs, mid.W1, mid.W2, mid.S1, mid.S2)]
    start = MLPMemoryState(*leaves[-4:], mid.anchor1, mid.anchor2, mid.offset, mid.chunk_size)
    gen = torch.Generator().manual_seed(0)
    o_ref, state_ref = naive_chunk_mlp_memory(*leaves[:6], initial_state=start, **kw)
    cots = [torch.randn(x.shape, generator=gen, dtype=f64).to(device) for x in (o_ref, state_ref.W1, state_ref.W2)]

    def run(block):
        monkeypatch.setattr(dual_form, "_block_chunks", lambda NC, *sizes: min(NC, block))
        o, state = naive_chunk_mlp_memory(*leaves[:6], initial_state=start, **kw)
        grads = torch.autograd.grad((o, state.W1, state.W2), leaves, cots)
        return [o, state.W1, state.W2, state.anchor1, *grads]

    whole = run(1000)
    for block in (1, 2, 3):
        for i, (got, want) in enumerate(zip(run(block), whole)):
            assert_close(f"blocks of {block}: result {i}", got, want, 1e-12)


def _dual_form_node(t: torch.Tensor):
    """The ``MLPDualForm`` node in the autograd graph behind ``t``."""
    stack, seen = [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("MLPDualForm"):
            return node
        stack.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError("no MLPDualForm node behind the output")


@pytest.mark.parametrize("T", [1, 100, 400])
def test_dual_form_keeps_about_sqrt_chunks_checkpoints(monkeypatch, T, device):
    """With gradients the forward keeps a checkpoint per block and a block holds on the order of
    sqrt(NC) chunks (here every state is larger than the cache budget, which alone would make
    blocks of one chunk, a checkpoint per chunk)."""
    monkeypatch.setattr(dual_form, "_BLOCK_BYTES", 1)
    K, Dh = 8, 16
    case = make_case(seed=3, B=1, T=T, H=1, K=K, V=K, dtype=f32, chunk_size=1, family="mlp", hidden=Dh,
                     device=device)
    W1, W2 = (x.clone().requires_grad_() for x in case.initial_state)
    o, _ = naive_chunk_mlp_memory(*case.inputs, chunk_size=1, initial_state=(W1, W2))
    checks = [x for x in _dual_form_node(o).saved_tensors if x is not None and x.shape[-2:] == (K, 2 * Dh)]
    assert len(checks) == 1
    # blocks of half the least-memory size, below sqrt(NC) / 2: 58 blocks of 7 chunks at T = 400
    assert math.isqrt(T) <= checks[0].shape[0] <= 4 * math.isqrt(T) + 1
    assert dual_form._block_chunks(T, 4 * K * Dh * 4, 40 * Dh * 4, save=False) == 1  # no backward: the cache's
    o.sum().backward()
    assert W1.grad is not None and torch.isfinite(W1.grad).all()


SAVING_FUNCTIONS = {"naive_chunk": (naive_chunk_mlp_memory, dual_form.MLPDualForm),
                    "chunk": (chunk_mlp_memory, chunk_module.ChunkMLPMemoryFunction),
                    "fused_recurrent": (fused_recurrent_mlp_memory, fused_recurrent_module.FusedRecurrentMLPMemoryFunction)}


@pytest.mark.parametrize("name", list(SAVING_FUNCTIONS))
def test_forward_keeps_backward_state_only_when_differentiated(monkeypatch, name, device):
    """Inference with learned weights (they require grad) under ``torch.no_grad()`` must not keep
    what a backward would need (checkpoint states and every token's pre-activations in the dual
    form, 8 Dh (K + V) / BT bytes a token and head in the kernels): the forward is told, and told
    True once grad mode is on."""
    op, function = SAVING_FUNCTIONS[name]
    told = []
    forward = function.forward

    def spy(ctx, *args):
        told.append(args[-1])  # the save flag is the last argument
        return forward(ctx, *args)

    monkeypatch.setattr(function, "forward", staticmethod(spy))
    case = make_case(seed=2, B=1, T=20, H=1, K=16, V=16, dtype=f32, chunk_size=16, family="mlp", device=device)
    params = [x.detach().clone().requires_grad_() for x in case.initial_state]
    with torch.no_grad():
        o, _ = op(*case.inputs, chunk_size=16, initial_state=params)
    assert told == [False] and not o.requires_grad
    o, _ = op(*case.inputs, chunk_size=16, initial_state=params)
    assert told == [False, True]
    o.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_final_state_is_named_and_float32(device):
    case = make_case(seed=0, B=2, T=9, H=1, K=4, V=3, dtype=bf16, chunk_size=4, family="mlp", hidden=6, device=device)
    o, state = naive_chunk_mlp_memory(*case.inputs, chunk_size=4, initial_state=case.initial_state,
                                      output_final_state=True)
    assert isinstance(state, MLPMemoryState) and o.dtype == bf16
    assert state.W1.shape == (2, 1, 4, 6) and state.W2.shape == (2, 1, 6, 3)
    assert all(getattr(state, f).dtype == f32 for f in ("W1", "W2", "S1", "S2", "anchor1", "anchor2"))
    assert state.offset.tolist() == [1, 1] and state.chunk_size == 4


@pytest.mark.parametrize("chunk_size,max_update_norm", [(16, None), (64, None), (16, 3e-3)])
def test_chunked_prefill_then_token_by_token_decode(chunk_size, max_update_norm, device):
    """Decoding one token per call with fused_recurrent after a chunked prefill equals one chunked
    call, with update clipping too."""
    case = make_case(seed=3, B=2, T=chunk_size + 9, H=2, K=16, V=16, dtype=f32, chunk_size=chunk_size, state="MS",
                     family="mlp", hidden=40, activation="gelu", residual=True, device=device)
    prefill = chunk_size // 2 + 3  # ends mid-chunk
    kw = dict(chunk_size=chunk_size, output_final_state=True, max_update_norm=max_update_norm, **case.extra)
    o_full, st_full = chunk_mlp_memory(*case.inputs, initial_state=case.initial_state, **kw)
    o, state = chunk_mlp_memory(*(x[:, :prefill] for x in case.inputs), initial_state=case.initial_state, **kw)
    outs = [o]
    for t in range(prefill, case.q.shape[1]):
        o, state = fused_recurrent_mlp_memory(*(x[:, t:t + 1] for x in case.inputs), initial_state=state, **kw)
        outs.append(o)
    tol = tolerance(f32, device)
    assert_close("decoded outputs", torch.cat(outs, dim=1), o_full, tol)
    for name in ("W1", "W2", "S1", "S2", "anchor1", "anchor2"):
        assert_close(f"decoded final {name}", getattr(state, name), getattr(st_full, name), tol)
    assert torch.equal(state.offset, st_full.offset)


def test_kernels_reject_unsupported_chunk_sizes_dims_and_float64(device):
    case = make_case(seed=0, B=1, T=8, H=1, K=4, V=4, dtype=f32, chunk_size=16, family="mlp", device=device)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_mlp_memory(*case.inputs, chunk_size=8, initial_state=case.initial_state)
    big = make_case(seed=0, B=1, T=4, H=1, K=130, V=4, dtype=f32, chunk_size=16, family="mlp", hidden=4,
                    device=device)
    for op in (chunk_mlp_memory, fused_recurrent_mlp_memory):
        with pytest.raises(ValueError, match="K = 130"):
            op(*big.inputs, chunk_size=16, initial_state=big.initial_state)
        with pytest.raises(TypeError, match="float64"):
            op(*(x.double() for x in case.inputs), chunk_size=16, initial_state=case.initial_state)


@pytest.mark.parametrize("op", [chunk_mlp_memory, fused_recurrent_mlp_memory], ids=["chunk", "fused_recurrent"])
def test_kernels_leave_the_initial_state_untouched(op, device):
    """The kernels update their state buffers in place: those must be copies, never the caller's tensors."""
    case = make_case(seed=5, B=2, T=20, H=1, K=8, V=8, dtype=f32, chunk_size=16, state="MS", family="mlp",
                     device=device)
    before = [x.clone() for x in case.initial_state]
    _, state = op(*case.inputs, chunk_size=16, initial_state=case.initial_state, output_final_state=True)
    assert all(torch.equal(x, y) for x, y in zip(case.initial_state, before))
    assert not torch.equal(state.W1, before[0])


@pytest.mark.parametrize("op", [chunk_mlp_memory, fused_recurrent_mlp_memory], ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("lengths", [[3, 0, 40], [25, 17]], ids=["ends-mid-chunk", "ends-on-boundary"])
def test_gradients_through_a_mid_chunk_state(op, lengths, device):
    """Starting from a state 13 tokens into a chunk of 16: gradients of every input and of every
    state field (weights, momenta, anchors) equal autograd through the float64 dual form."""
    C = 16
    case = make_case(seed=11, B=1, T=sum(lengths), H=2, K=8, V=8, dtype=f32, chunk_size=C, state="MS", family="mlp",
                     hidden=36, lengths=lengths, activation="gelu", residual=True, device=device)
    N = len(lengths)
    gen = torch.Generator().manual_seed(0)
    W1, W2, S1, S2 = (torch.randn(N, *x.shape[1:], generator=gen).to(device) * x.std() for x in case.initial_state)
    a1, a2 = W1 + 0.1 * torch.randn(W1.shape, generator=gen).to(device), W2 + 0.1 * torch.randn(W2.shape,
                                                                                              generator=gen).to(device)
    fields = (W1, W2, S1, S2, a1, a2)
    offset = torch.full((N,), C - 3, dtype=torch.long, device=device)

    def run(impl, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in case.inputs + fields]
        state = MLPMemoryState(*leaves[6:], offset=offset, chunk_size=C)
        o, final = impl(*leaves[:6], chunk_size=C, initial_state=state, output_final_state=True,
                        cu_seqlens=case.cu_seqlens, **case.extra)
        outs = [o] + [getattr(final, f) for f in ("W1", "W2", "S1", "S2", "anchor1", "anchor2")]
        g = torch.Generator().manual_seed(1)
        loss = sum((y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)).sum() for y in outs)
        return outs, torch.autograd.grad(loss, leaves)

    ref_outs, ref_grads = run(naive_chunk_mlp_memory, torch.float64)
    outs, grads = run(op, f32)
    names = ["q", "k", "v", "alpha", "eta", "theta", "W1", "W2", "S1", "S2", "anchor1", "anchor2"]
    for name, x, ref in zip(["o", *names[6:]], outs, ref_outs):
        assert_close(name, x, ref, tolerance(f32, device))
    for name, x, ref in zip(names, grads, ref_grads):
        assert_close(f"d{name}", x, ref, tolerance(f32, device, "grad"))


def test_float32_wide_heads_run_in_16_token_tiles(device):
    """float32 inputs with K or V > 64 use 16-token tiles (four per chunk of 64) to fit shared memory:
    that path, continuation from mid-chunk included, matches the reference too."""
    from titans_layers.ops.mlp_memory.chunk import mlp_launch
    tile = lambda K, dtype: mlp_launch(64, K, K, 20, dtype).BT
    assert tile(72, f32) == 16 and tile(64, f32) == 32 and tile(72, bf16) == 32
    case = make_case(seed=9, B=1, T=70, H=1, K=72, V=72, dtype=f32, chunk_size=64, state="MS", family="mlp",
                     hidden=20, split=37, residual=True, device=device)
    check_against_reference(chunk_mlp_memory, case)
    check_continuation(chunk_mlp_memory, case)


@pytest.mark.parametrize("launch", [dict(BT=16), dict(fwd_BH=16, bwd_BH=32), dict(fwd_BH=64, BT=16, fwd_warps=4),
                                    dict(bwd_BH=64)],
                         ids=["tile16", "bh16-32", "bh64-tile16-warps4", "bwd-bh64"])
def test_launch_overrides_keep_the_results(launch, device):
    """Other tile sizes, Dh blocks and warps (what ``benchmark_mlp_memory --launches`` sweeps on a
    GPU) compute the same function: the reference, and continuation across a mid-chunk split."""
    from titans_layers.ops.mlp_memory.chunk import mlp_launch, override_mlp_launch
    case = make_case(seed=11, B=2, T=70, H=2, K=16, V=16, dtype=f32, chunk_size=32, state="MS", family="mlp",
                     hidden=40, split=21, device=device)  # Dh = 40: a partial last block at BH = 16, 32, 64
    with override_mlp_launch(**launch):
        assert all(getattr(mlp_launch(32, 16, 16, 40, f32), k) == v for k, v in launch.items())
        check_against_reference(chunk_mlp_memory, case)
        check_continuation(chunk_mlp_memory, case)
    assert mlp_launch(32, 16, 16, 40, f32).BT == 32  # restored on leaving


def test_backward_dh_block_follows_the_gpu():
    """The backward's Dh block: on sm_90 and later with room for it, 64 for 16-bit inputs at K, V
    <= 64 and 32 up to 128; 16 for float32 inputs, on sm_80, on GPUs with 99 KB of shared memory
    a block and under the interpreter; never wider than Dh needs."""
    from titans_layers.ops.common.triton_utils import GPU
    from titans_layers.ops.mlp_memory.chunk import mlp_launch
    h100, a100, rtx5090 = GPU(90, 227 << 10), GPU(80, 163 << 10), GPU(120, 99 << 10)
    bh = lambda K, Dh, dtype, gpu: mlp_launch(64, K, K, Dh, dtype, gpu).bwd_BH
    sm90 = [bh(64, 256, bf16, h100), bh(64, 256, f16, h100), bh(128, 256, bf16, h100), bh(64, 256, f32, h100)]
    assert sm90 == [64, 64, 32, 16]
    assert [bh(64, 256, bf16, a100), bh(64, 256, bf16, rtx5090), bh(64, 256, bf16, None)] == [16, 16, 16]
    assert bh(64, 256, bf16, GPU(90, 204 << 10)) == 32  # room for the narrower block only
    assert [bh(64, 20, bf16, h100), bh(64, 8, bf16, h100)] == [32, 16]
    assert all(mlp_launch(64, 64, 64, 256, bf16, gpu).fwd_BH == 32 for gpu in (a100, h100, None))


def test_tiles_follow_the_gpus_shared_memory():
    """On a GPU with 99 KB of shared memory a block (sm_86, sm_89, sm_120) the chunk kernels take
    16-token tiles where 32-token ones do not fit (16-bit inputs above K = 64, float32 inputs).
    Float32 inputs above K = 64 fit there only the forward, in 16-column Dh blocks: a call that
    needs the backward gets an error naming its need, the GPU and what fits; the decode kernel needs
    no check. A100 and H100 launches are unchanged. ``test_kernel_compile.py`` holds the tables to
    the kernels."""
    from titans_layers.ops.common.triton_utils import GPU
    from titans_layers.ops.mlp_memory.chunk import mlp_launch
    a100, h100 = GPU(80, 163 << 10), GPU(90, 227 << 10)
    bt = lambda C, K, dtype, gpu: mlp_launch(C, K, K, 256, dtype, gpu).BT
    for small in (GPU(86, 99 << 10), GPU(89, 99 << 10), GPU(120, 99 << 10)):
        assert [bt(64, 64, bf16, small), bt(64, 64, f16, small), bt(64, 128, bf16, small), bt(64, 96, f16, small),
                bt(64, 64, f32, small), bt(16, 128, bf16, small)] == [32, 32, 16, 16, 16, 16]
        with pytest.raises(ValueError, match=rf"chunk backward kernel at K = 128, V = 128 with torch.float32 inputs.* "
                                             rf"needs 117 KB .*sm_{small.capability}\) has 99 KB \(without gradients "
                                             rf"the forward alone needs 97 KB\)"):
            mlp_launch(64, 128, 128, 256, f32, small)
        forward = mlp_launch(64, 128, 128, 256, f32, small, kernels=("fwd",))
        decode = mlp_launch(64, 128, 128, 256, f32, small, kernels=())
        assert (forward.BT, forward.fwd_BH, decode.fwd_BH) == (16, 16, 32)
    with pytest.raises(ValueError, match=r"chunk forward kernel at K = 96, V = 96 .* needs 97 KB .*has 64 KB\. "):
        mlp_launch(64, 96, 96, 256, f32, GPU(75, 64 << 10), kernels=("fwd",))
    for gpu in (a100, h100, None):
        assert [bt(64, 64, bf16, gpu), bt(64, 128, bf16, gpu), bt(64, 64, f32, gpu), bt(64, 128, f32, gpu)] \
            == [32, 32, 32, 16]


def test_float32_wide_heads_without_gradients_on_a_99_kb_gpu(monkeypatch, device):
    """Float32 inputs above K = 64 on a GPU with 99 KB a block: without gradients the chunk forward
    runs in 16-column Dh blocks and the decode kernel as anywhere, both matching the float64
    reference; with gradients both ops raise before launching anything."""
    from titans_layers.ops.common.triton_utils import GPU
    from titans_layers.ops.mlp_memory import chunk as chunk_mod, fused_recurrent as fused_mod
    for module in (chunk_mod, fused_mod):
        monkeypatch.setattr(module, "gpu_of", lambda x: GPU(89, 99 << 10))
    case = make_case(seed=4, B=1, T=37, H=1, K=72, V=72, dtype=f32, chunk_size=16, state="MS", family="mlp",
                     hidden=20, device=device)
    for op in (chunk_mlp_memory, fused_recurrent_mlp_memory):
        check_against_reference(op, case, check_grads=False)
        inputs = [x.detach().requires_grad_() for x in case.inputs]
        with pytest.raises(ValueError, match=r"backward kernel .* needs 117 KB .* has 99 KB"):
            op(*inputs, chunk_size=16, initial_state=case.initial_state, **case.extra)


def test_low_precision_dot_operands(device):
    """``MLPLaunch.lowp_dots``: the kernels' ``tl.dot`` operands rounded to the bfloat16 / float16
    input dtype (emulated exactly under the interpreter) keep the SPEC tolerances against the float64
    reference, forward, states and every gradient, across a mid-chunk split; and the setting reaches
    the kernels (the outputs differ from the tf32 launch's)."""
    from titans_layers.ops.mlp_memory.chunk import override_mlp_launch
    for dtype in (bf16, f16):
        case = make_case(seed=12, B=2, T=70, H=2, K=32, V=32, dtype=dtype, chunk_size=32, state="MS", family="mlp",
                         hidden=72, split=21, activation="gelu", device=device)
        run = lambda: chunk_mlp_memory(*case.inputs, chunk_size=32, initial_state=case.initial_state, **case.extra)[0]
        tf32 = run()
        with override_mlp_launch(lowp_dots=True):
            assert not torch.equal(run(), tf32)
            check_against_reference(chunk_mlp_memory, case)
            check_continuation(chunk_mlp_memory, case)


def test_kernel_precisions(monkeypatch):
    """Which ``PRECISION`` the chunk kernels get: fp32 inputs "ieee", 16-bit inputs "tf32" or with
    ``lowp_dots`` their own dtype; under the interpreter tf32 and bf16 become their emulations."""
    from titans_layers.ops.common import triton_utils
    from titans_layers.ops.mlp_memory.chunk import kernel_precision, mlp_launch, override_mlp_launch
    launch = mlp_launch(32, 16, 16, 32, bf16)
    for interpreting, expected in ((False, ["ieee", "tf32", "tf32", "ieee", "bf16", "fp16"]),
                                   (True, ["ieee", "emulate_tf32", "emulate_tf32", "ieee", "emulate_bf16", "fp16"])):
        monkeypatch.setattr(triton_utils, "is_interpreting", lambda: interpreting)
        with override_mlp_launch(lowp_dots=True):
            lowp = mlp_launch(32, 16, 16, 32, bf16)
        got = [kernel_precision(x, dtype) for x in (launch, lowp) for dtype in (f32, bf16, f16)]
        assert got == expected, (interpreting, got)


def test_launch_override_names_unknown_fields():
    from titans_layers.ops.mlp_memory.chunk import override_mlp_launch
    with pytest.raises(ValueError, match="unknown fields.*tile"):
        with override_mlp_launch(tile=16):
            pass
