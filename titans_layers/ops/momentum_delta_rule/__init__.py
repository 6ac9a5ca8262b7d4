"""Linear-memory op family: the gated momentum-delta rule (SPEC §1, ``f(x; M) = x @ M``)."""

from titans_layers.ops.momentum_delta_rule.chunk import chunk_momentum_delta_rule
from titans_layers.ops.momentum_delta_rule.fused_recurrent import fused_recurrent_momentum_delta_rule
from titans_layers.ops.momentum_delta_rule.naive import (naive_chunk_momentum_delta_rule,
                                                         naive_recurrent_momentum_delta_rule)
from titans_layers.ops.momentum_delta_rule.state import MomentumDeltaRuleState

__all__ = [
    "MomentumDeltaRuleState",
    "chunk_momentum_delta_rule",
    "fused_recurrent_momentum_delta_rule",
    "naive_chunk_momentum_delta_rule",
    "naive_recurrent_momentum_delta_rule",
]
