"""``TitansCache``: fla's ``Cache`` whose row operations keep the layers' state types.

The layers keep their decoding state in named structures (the memory's ``MomentumDeltaRuleState``
/ ``MLPMemoryState``, the attention's ``WindowKVCache``, MAC's ``MACState``). fla's cache maps a
function over every tensor of a state when generation reorders, repeats or selects batch rows
(beam search, several return sequences), and rebuilds NamedTuples as plain tuples on the way,
which the layers can no longer read. This cache rebuilds every structure with its own type.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from fla.models.utils import Cache, FLALayer


def map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``function`` to every tensor inside ``value`` (dicts, lists, tuples, NamedTuples and
    dataclasses, nested), rebuilding each container with its own type; other leaves are kept."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, function) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(map_tensors(v, function) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, function) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), function)
                                             for f in dataclasses.fields(value)})
    return value


class TitansCacheLayer(FLALayer):
    """fla's per-layer cache entry with a type-preserving ``_map_state``."""

    def _map_state(self, function):
        return map_tensors(self.state, function)


class TitansCache(Cache):
    """fla's ``Cache`` (one entry per stateful sublayer, fla's layer helpers work unchanged) whose
    ``reorder_cache`` / ``batch_repeat_interleave`` / ``batch_select_indices`` keep the states'
    types. The Titans models create it when a cached call gets no cache; a plain fla ``Cache``
    passed in works too, except for those row operations."""

    def __init__(self, seen_tokens: int = 0, **kwargs):
        super().__init__(seen_tokens=seen_tokens, **kwargs)
        self.layer_class_to_replicate = TitansCacheLayer
