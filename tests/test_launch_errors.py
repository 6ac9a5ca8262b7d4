"""A kernel that needs more shared memory than the GPU gives a block fails at its launch with
Triton's ``OutOfResources``; every launcher turns it into a ValueError that names the kernel, the
problem and what needs less (``triton_utils.explained_launch``); the linear chunk kernels first try
narrower V blocks (``triton_utils.launch_first_fitting``). The interpreter never runs out, so each
kernel is swapped for one whose launch raises what a GPU with 99 KB a block would."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from titans_layers.ops import (chunk_mlp_memory, chunk_momentum_delta_rule, fused_recurrent_mlp_memory,
                               fused_recurrent_momentum_delta_rule)
from titans_layers.ops.common import triton_utils
from titans_layers.ops.mlp_memory import chunk as mlp_chunk
from titans_layers.ops.mlp_memory import fused_recurrent as mlp_fused
from titans_layers.ops.momentum_delta_rule import chunk as linear_chunk
from titans_layers.ops.momentum_delta_rule import fused_recurrent as linear_fused
from titans_layers.testing import make_case


class _Overflowing:
    """Launches like a kernel that needs 132 KB of shared memory on a GPU with 99 KB."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise OutOfResources(132 << 10, 99 << 10, "shared memory")
        return launch


# (module, kernel, op, family, backward, update clipping, head dim)
SITES = [
    (mlp_chunk, "chunk_mlp_memory_fwd_kernel", chunk_mlp_memory, "mlp", False, None, 8),
    (mlp_chunk, "chunk_mlp_memory_bwd_kernel", chunk_mlp_memory, "mlp", True, None, 8),
    (mlp_fused, "fused_recurrent_mlp_memory_fwd_kernel", fused_recurrent_mlp_memory, "mlp", False, None, 8),
    (linear_chunk, "chunk_momentum_delta_rule_fwd_kernel", chunk_momentum_delta_rule, "linear", False, None, 8),
    (linear_chunk, "chunk_momentum_delta_rule_bwd_kernel", chunk_momentum_delta_rule, "linear", True, None, 8),
    (linear_chunk, "chunk_momentum_delta_rule_bwd_split_kernel", chunk_momentum_delta_rule, "linear", True, 1.0, 96),
    (linear_fused, "fused_recurrent_momentum_delta_rule_fwd_kernel", fused_recurrent_momentum_delta_rule, "linear",
     False, None, 8),
]


@pytest.mark.parametrize("module, kernel, op, family, backward, clip, dim", SITES, ids=[s[1] for s in SITES])
def test_out_of_shared_memory_is_explained(monkeypatch, module, kernel, op, family, backward, clip, dim, device):
    case = make_case(seed=3, B=1, T=20, H=2, K=dim, V=dim, dtype=torch.bfloat16, chunk_size=16, family=family,
                     state="M", device=device)
    monkeypatch.setattr(module, kernel, _Overflowing())
    kwargs = dict(chunk_size=16, initial_state=case.initial_state, max_update_norm=clip, **case.extra)
    inputs = [x.detach().requires_grad_(backward) for x in case.inputs]
    with pytest.raises(ValueError, match=rf"kernel at K = {dim}, V = {dim} with torch.bfloat16 inputs.* needs 132 KB "
                                         rf"of shared memory a block; this GPU has 99 KB\. Smaller head dims"):
        o, _ = op(*inputs, **kwargs)
        o.sum().backward()


class _FitsUpTo:
    """Launches ``kernel`` like a GPU that has shared memory for V blocks of at most ``max_BV``
    columns (a wider launch raises ``OutOfResources``); records each launch's BV, tried or run."""

    def __init__(self, kernel, max_BV: int):
        self.kernel, self.max_BV, self.tried = kernel, max_BV, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tried.append(kwargs["BV"])
            if kwargs["BV"] > self.max_BV:
                raise OutOfResources(132 << 10, 99 << 10, "shared memory")
            return self.kernel[grid](*args, **kwargs)
        return launch


def _run_linear(case, clip, backward=True):
    """chunk_momentum_delta_rule on ``case``: the output and, with ``backward``, the gradients."""
    inputs = [x.detach().requires_grad_(backward) for x in case.inputs]
    state = tuple(x.detach().requires_grad_(backward) for x in case.initial_state)
    o, _ = chunk_momentum_delta_rule(*inputs, chunk_size=32, initial_state=state, max_update_norm=clip)
    if not backward:
        return [o]
    o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(o))
    return [o] + [x.grad for x in (*inputs, *state)]


@pytest.mark.parametrize("kernel", ["chunk_momentum_delta_rule_fwd_kernel", "chunk_momentum_delta_rule_bwd_kernel"])
def test_linear_kernels_take_narrower_v_blocks_where_the_widest_do_not_fit(monkeypatch, kernel, device):
    """A 99 KB GPU cannot hold the float32 backward's 64-column V blocks (132 KB at K = 64): the
    launch takes the next narrower block that fits (V blocks are independent programs), remembers
    it, and the results are the widest block's up to summation order."""
    monkeypatch.setattr(triton_utils, "_FIRST_FIT", {})
    case = make_case(seed=4, B=2, T=70, H=2, K=40, V=40, dtype=torch.float32, chunk_size=32, family="linear",
                     state="MS", device=device)
    backward = "bwd" in kernel
    want = _run_linear(case, None, backward)
    fits = _FitsUpTo(getattr(linear_chunk, kernel), max_BV=16)
    monkeypatch.setattr(linear_chunk, kernel, fits)
    for tried in ([64, 32, 16], [16]):  # the second call goes straight to what fitted
        fits.tried.clear()
        got = _run_linear(case, None, backward)
        assert fits.tried == tried
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_linear_clipped_backward_falls_back_to_narrower_split_blocks(monkeypatch, device):
    """Clipped, one program holds all of V: where that block does not fit, the split kernel walks V
    in sub-blocks, narrower until they fit (float32 at K = V = 64 on a 99 KB GPU: 32 columns)."""
    monkeypatch.setattr(triton_utils, "_FIRST_FIT", {})
    case = make_case(seed=6, B=1, T=50, H=2, K=40, V=40, dtype=torch.float32, chunk_size=32, family="linear",
                     state="MS", device=device)
    want = _run_linear(case, 0.5)
    single = _FitsUpTo(linear_chunk.chunk_momentum_delta_rule_bwd_kernel, max_BV=0)
    split = _FitsUpTo(linear_chunk.chunk_momentum_delta_rule_bwd_split_kernel, max_BV=32)
    monkeypatch.setattr(linear_chunk, "chunk_momentum_delta_rule_bwd_kernel", single)
    monkeypatch.setattr(linear_chunk, "chunk_momentum_delta_rule_bwd_split_kernel", split)
    got = _run_linear(case, 0.5)
    assert (single.tried, split.tried) == ([64], [64, 32])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
