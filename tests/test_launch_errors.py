"""A kernel that needs more shared memory than the GPU gives a block fails at its launch with
Triton's ``OutOfResources``; every launcher turns it into a ValueError that names the kernel, the
problem and what needs less (``triton_utils.explained_launch``). The interpreter never runs out, so
each kernel is swapped for one whose launch raises what a GPU with 99 KB a block would."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from titans_layers.ops import (chunk_mlp_memory, chunk_momentum_delta_rule, fused_recurrent_mlp_memory,
                               fused_recurrent_momentum_delta_rule)
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
