"""Layer constructors from a :class:`TitansConfig`: the memory, the attention, the persistent
tokens and fla's token mixers, so every block builds them the same way."""

from __future__ import annotations

import torch.nn as nn

from titans_layers.models.configuration_titans import TitansConfig
from titans_layers.modules import NeuralMemory, PersistentMemory, SlidingWindowAttention


def make_memory(config: TitansConfig, layer_idx: int) -> NeuralMemory:
    """A ``NeuralMemory`` with the config's memory options and its own cache index."""
    return NeuralMemory(config.hidden_size, config.num_heads, memory=config.memory, head_dim=config.head_dim,
                        chunk_size=config.chunk_size, mlp_expansion=config.mlp_expansion,
                        activation=config.memory_activation, mlp_residual=config.mlp_residual,
                        use_short_conv=config.use_short_conv, conv_size=config.conv_size,
                        max_step_size=config.max_step_size, max_update_norm=config.memory_max_update_norm,
                        use_output_gate=config.use_output_gate,
                        use_output_norm=config.use_output_norm, norm_eps=config.norm_eps,
                        backend=config.memory_backend, layer_idx=layer_idx)


def make_attention(config: TitansConfig, window_size: int, layer_idx: int) -> SlidingWindowAttention:
    """A ``SlidingWindowAttention`` over ``window_size`` tokens with its own cache index."""
    return SlidingWindowAttention(config.hidden_size, config.num_heads, window_size, num_kv_heads=config.num_kv_heads,
                                  head_dim=config.head_dim, rope_base=config.rope_base, layer_idx=layer_idx)


def make_persistent(config: TitansConfig) -> PersistentMemory | None:
    """The block's ``num_persistent_tokens`` learned tokens, or None when there are none."""
    if config.num_persistent_tokens == 0:
        return None
    return PersistentMemory(config.num_persistent_tokens, config.hidden_size, init_std=config.initializer_range)


def make_fla_mixer(kind: str, config: TitansConfig, layer_idx: int) -> nn.Module:
    """fla's token mixer for ``kind`` ("gated_deltanet", "deltanet", "mamba2").

    Defaults: the config's width, heads and ``head_dim`` (GatedDeltaNet: ``num_heads`` heads of
    ``head_dim``; DeltaNet: ``num_heads`` heads of ``D / num_heads``; Mamba2: ``expand = 2`` and
    heads of ``head_dim``, so ``2 * D / head_dim`` heads), then ``config.fla_mixer_kwargs[kind]``
    on top. fla's kernels are Triton: they run on CUDA (fla's autotuned kernels do not run under
    Triton's CPU interpreter).
    """
    extra = dict(config.fla_mixer_kwargs.get(kind, {}))
    D = config.hidden_size
    if kind == "gated_deltanet":
        from fla.layers import GatedDeltaNet
        args = dict(hidden_size=D, num_heads=config.num_heads, head_dim=config.head_dim, norm_eps=config.norm_eps)
        return GatedDeltaNet(**{**args, **extra}, layer_idx=layer_idx)
    if kind == "deltanet":
        from fla.layers import DeltaNet
        args = dict(hidden_size=D, num_heads=config.num_heads, norm_eps=config.norm_eps)
        return DeltaNet(**{**args, **extra}, layer_idx=layer_idx)
    if kind == "mamba2":
        from fla.layers import Mamba2
        args = {**dict(hidden_size=D, head_dim=config.head_dim, expand=2, norm_eps=config.norm_eps), **extra}
        if "num_heads" not in args:
            if (args["expand"] * D) % args["head_dim"]:
                raise ValueError(f"mamba2: `expand * hidden_size` ({args['expand'] * D}) must be divisible by "
                                 f"`head_dim` ({args['head_dim']}); set `fla_mixer_kwargs['mamba2']`")
            args["num_heads"] = args["expand"] * D // args["head_dim"]
        return Mamba2(**args, layer_idx=layer_idx)
    raise ValueError(f"`kind` must be one of ('gated_deltanet', 'deltanet', 'mamba2'), got {kind!r}")
