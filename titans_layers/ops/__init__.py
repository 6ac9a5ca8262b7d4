"""Memory-update ops. Each family has a per-token reference (``naive_recurrent_*``), a vectorised
chunked PyTorch form (``naive_chunk_*``), Triton chunkwise kernels (``chunk_*``) and a Triton
decode kernel (``fused_recurrent_*``), all held to the contract of SPEC §1.

Families: ``momentum_delta_rule`` (linear memory) and ``mlp_memory`` (MLP memory), each with
all four. Under ``torch.compile`` the ops run as the custom op of
:mod:`titans_layers.ops.library`, so compiled models trace them without graph breaks."""

from titans_layers.ops import library  # noqa: F401  (registers the custom ops)
from titans_layers.ops.mlp_memory import (MLPMemoryState, chunk_mlp_memory, fused_recurrent_mlp_memory,
                                         naive_chunk_mlp_memory, naive_recurrent_mlp_memory)
from titans_layers.ops.momentum_delta_rule import (MomentumDeltaRuleState, chunk_momentum_delta_rule,
                                                   fused_recurrent_momentum_delta_rule,
                                                   naive_chunk_momentum_delta_rule,
                                                   naive_recurrent_momentum_delta_rule)

__all__ = [
    "MLPMemoryState",
    "MomentumDeltaRuleState",
    "chunk_mlp_memory",
    "chunk_momentum_delta_rule",
    "fused_recurrent_mlp_memory",
    "fused_recurrent_momentum_delta_rule",
    "naive_chunk_mlp_memory",
    "naive_chunk_momentum_delta_rule",
    "naive_recurrent_mlp_memory",
    "naive_recurrent_momentum_delta_rule",
]
