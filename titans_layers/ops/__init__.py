"""Memory-update ops. Each family has a per-token reference (``naive_recurrent_*``), a vectorised
chunked PyTorch form (``naive_chunk_*``), Triton chunkwise kernels (``chunk_*``) and a Triton
decode kernel (``fused_recurrent_*``), all held to the contract of SPEC §1."""

from titans_layers.ops.momentum_delta_rule import (MomentumDeltaRuleState, chunk_momentum_delta_rule,
                                                   fused_recurrent_momentum_delta_rule,
                                                   naive_chunk_momentum_delta_rule,
                                                   naive_recurrent_momentum_delta_rule)

__all__ = [
    "MomentumDeltaRuleState",
    "chunk_momentum_delta_rule",
    "fused_recurrent_momentum_delta_rule",
    "naive_chunk_momentum_delta_rule",
    "naive_recurrent_momentum_delta_rule",
]
