"""The ops keep their own precision under ``torch.autocast`` (SPEC §1, promise 5: state and
accumulation in float32): a model that runs under autocast gets from every op exactly what the
op returns without it, forward and backward."""

import pytest
import torch

import titans_layers.ops as ops
from titans_layers.testing import make_case
from titans_layers.testing.compare import assert_identical

IMPLS = ["naive_recurrent", "naive_chunk", "chunk", "fused_recurrent"]


def _run(op, case, autocast: bool):
    """o and the gradients of every input and initial-state tensor of ``o^2 + final momentum``."""
    leaves = [x.detach().clone().requires_grad_() for x in (*case.inputs, *case.initial_state)]
    n = len(case.inputs)
    with torch.autocast(case.q.device.type, dtype=torch.bfloat16, enabled=autocast):
        o, state = op(*leaves[:n], chunk_size=case.chunk_size, initial_state=tuple(leaves[n:]),
                      output_final_state=True, **case.extra)
    momentum = state.S1 if case.family == "mlp" else state.S  # [N, H, K, Dh] or [N, H, K, V]
    (o.square().sum() + momentum.sum()).backward()
    return o, [x.grad for x in leaves]


@pytest.mark.parametrize("family", ["momentum_delta_rule", "mlp_memory"])
@pytest.mark.parametrize("impl", IMPLS)
def test_ops_ignore_autocast(impl, family, device):
    case = make_case(seed=3, B=1, T=20, H=1, K=16, V=16, dtype=torch.float32, chunk_size=16, state="MS",
                     family="mlp" if family == "mlp_memory" else "linear", device=device)
    op = getattr(ops, f"{impl}_{family}")
    o, grads = _run(op, case, autocast=False)
    o_ac, grads_ac = _run(op, case, autocast=True)
    assert o_ac.dtype == torch.float32
    assert_identical("o", o_ac, o)
    for i, (g_ac, g) in enumerate(zip(grads_ac, grads)):
        assert_identical(f"gradient of input {i}", g_ac, g)
