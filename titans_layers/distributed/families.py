"""What the context-parallel paths need to know about each memory-op family: its state fields,
how ``initial_state`` is read into one row per sequence, and how a state is put back together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import titans_layers.ops as ops
from titans_layers.ops.common.validation import OpShape, compute_dtype
from titans_layers.ops.mlp_memory.state import MLPMemoryState, resolve_mlp_state
from titans_layers.ops.momentum_delta_rule.state import MomentumDeltaRuleState, resolve_initial_state


@dataclass(frozen=True)
class Family:
    """One op family: ``name``, its state class and the state's tensor fields in order."""

    name: str
    state_cls: type
    fields: tuple

    def resolve(self, initial_state, shape: OpShape, chunk_size: int, device, dtype) -> tuple[list, torch.Tensor]:
        """``initial_state`` -> (weights in field order ``[N, H, ...]``, offsets ``[N]`` int64)."""
        if self.name == "linear":
            r = resolve_initial_state(initial_state, shape, chunk_size, device, dtype)
        else:
            r = resolve_mlp_state(initial_state, shape, chunk_size, device, dtype)
        return [getattr(r, f) for f in self.fields], r.offset

    def make_state(self, fields, offset: torch.Tensor, chunk_size: int):
        """A state NamedTuple from its weights (field order) and offsets."""
        return self.state_cls(*fields, offset=offset, chunk_size=chunk_size)

    def split_state(self, state) -> list[torch.Tensor]:
        return [getattr(state, f) for f in self.fields]


LINEAR = Family("linear", MomentumDeltaRuleState, ("M", "S", "anchor"))
MLP = Family("mlp", MLPMemoryState, ("W1", "W2", "S1", "S2", "anchor1", "anchor2"))

_OPS = {
    ops.naive_chunk_momentum_delta_rule: LINEAR, ops.chunk_momentum_delta_rule: LINEAR,
    ops.naive_recurrent_momentum_delta_rule: LINEAR, ops.fused_recurrent_momentum_delta_rule: LINEAR,
    ops.naive_chunk_mlp_memory: MLP, ops.chunk_mlp_memory: MLP,
    ops.naive_recurrent_mlp_memory: MLP, ops.fused_recurrent_mlp_memory: MLP,
}


def family_of(op) -> Family:
    """The family of one of the public ops of :mod:`titans_layers.ops`; TypeError otherwise."""
    try:
        return _OPS[op]
    except (KeyError, TypeError):
        raise TypeError("`op` must be one of the memory-update ops of titans_layers.ops (e.g. "
                        f"naive_chunk_momentum_delta_rule, chunk_mlp_memory), got {op!r}") from None


def global_rows(family: Family, initial_state, q, v, n_sequences: int, chunk_size: int):
    """``initial_state`` (given for the N global sequences, or broadcast from 1) read into full
    rows ``[N, H, ...]`` in the op's compute dtype (float64 for float64 inputs, else float32),
    still attached to autograd, and the offsets ``[N]``."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    shape = OpShape(B=1, T=0, H=H, K=K, V=V, N=n_sequences)
    return family.resolve(initial_state, shape, chunk_size, q.device, compute_dtype(q))
