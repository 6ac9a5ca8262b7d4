"""Where a case's writes sit relative to the update-clipping bound.

The clip decision is a discontinuity of the gradient (``d theta' / d theta`` jumps from 1 to 0), so
a token whose write sits on the bound to within the kernels' rounding makes any two correct
implementations disagree. Clipping tests keep drawn cases a relative margin away from the bound,
measured on the float64 trajectory of the family's chunked PyTorch form.
"""

from __future__ import annotations

from unittest import mock

import torch

from titans_layers.ops.common.triton_utils import dot_precision
from titans_layers.ops.mlp_memory import dual_form as _mlp_dual_form
from titans_layers.ops.mlp_memory import naive_chunk_mlp_memory
from titans_layers.ops.momentum_delta_rule import naive as _linear_naive
from titans_layers.ops.momentum_delta_rule import naive_chunk_momentum_delta_rule

# per family: the chunked float64 form, and the module whose ``clipped_step`` it calls
_TRAJECTORIES = {"linear": (naive_chunk_momentum_delta_rule, _linear_naive),
                 "mlp": (naive_chunk_mlp_memory, _mlp_dual_form)}


def clip_ratios(case) -> torch.Tensor:
    """``theta_t ||G_t|| / c`` of every token with theta_t > 0 on the float64 clipped trajectory
    (``case.extra["max_update_norm"]`` is c), in no particular order; > 1 means clipped."""
    op, module = _TRAJECTORIES[case.family]
    clipped_step = module.clipped_step
    ratios = []

    def record(theta, norm, bound):
        ratios.append((theta * norm / bound)[theta > 0].flatten())
        return clipped_step(theta, norm, bound)

    init = None if case.initial_state is None else tuple(x.double() for x in case.initial_state)
    with mock.patch.object(module, "clipped_step", record), torch.no_grad():
        op(*(x.double() for x in case.inputs), chunk_size=case.chunk_size, initial_state=init,
           cu_seqlens=case.cu_seqlens, **case.extra)
    return torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)


def clear_of_the_bound(case) -> bool:
    """No token's write within the kernels' rounding of the bound: relative 1e-4 where their dots
    are full float32, 5e-3 where they take tf32 operands (bfloat16 / float16 inputs, on a GPU and
    emulated under the interpreter)."""
    band = 1e-4 if dot_precision(case.dtype) == "ieee" else 5e-3
    ratios = clip_ratios(case)
    return ratios.numel() == 0 or (ratios - 1).abs().min().item() > band
