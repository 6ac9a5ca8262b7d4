"""Context parallelism on ``torch.distributed``: one packed sequence batch split across ranks.

- :func:`build_cp_context` / :class:`CPContext`: this rank's slice and what crosses its edges.
- :func:`context_parallel_update`: any memory-update op of :mod:`titans_layers.ops` under context
  parallelism (linear memory: state passing in parallel; any memory: in sequence, or head parallel).
- :func:`sequential_stage`, :func:`receive_state` / :func:`hand_on_state`: chain a per-slice
  computation by a state passed rank to rank (the second pair keeps ordinary autograd, parameters included).
- :func:`left_halo`: the tokens of the preceding ranks a causal window needs (short convolution,
  sliding-window attention), with gradients sent back.

Imports go one way: models -> modules -> distributed -> ops; the ops never communicate.
"""

from titans_layers.distributed.context import CPContext, build_cp_context, check_context
from titans_layers.distributed.halo import left_halo
from titans_layers.distributed.memory import MODES, context_parallel_update
from titans_layers.distributed.sequential import hand_on_state, receive_state, sequential_stage

__all__ = ["CPContext", "MODES", "build_cp_context", "check_context", "context_parallel_update", "hand_on_state",
           "left_halo", "receive_state",
           "sequential_stage"]
