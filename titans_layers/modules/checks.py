"""Argument checks shared by the layers: constructor arguments, and the padding mask and packed
offsets of fla's layer interface."""

from __future__ import annotations

import math
import weakref

import torch

from titans_layers.ops.common.validation import check_cu_seqlens as check_offsets


def positive_int(name: str, value) -> int:
    """Return ``value`` if it is an int >= 1, else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def positive_finite(name: str, value) -> float:
    """Return ``value`` as a float if it is a finite real number > 0 (not a bool), else raise a
    ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite positive number, got {value!r}")
    return float(value)


def flag(name: str, value) -> bool:
    """Return ``value`` if it is a bool, else raise a ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}")
    return value


def head_dim_for(hidden_size: int, num_heads: int, head_dim: int | None) -> int:
    """The per-head width: ``head_dim`` if given (a positive int), else ``hidden_size // num_heads``,
    which must then divide evenly."""
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}) "
                             f"when `head_dim` is not given")
        head_dim = hidden_size // num_heads
    return positive_int("head_dim", head_dim)


def resolve_cache(past_key_values, kwargs: dict):
    """The cache of a layer or model call, under whichever keyword the caller used.

    Transformers up to 5.23 hands a model its cache as ``past_key_values``; from 5.24 on,
    ``generate()`` passes it as ``cache``. Layers and models take both: ``cache`` is popped from
    ``kwargs`` (so it does not travel on to sublayers twice) and the one cache is returned. Both
    given as different objects is an error (a host that passes a different cache under each name,
    e.g. fla 0.6's models under transformers >= 5.24, which build a fresh ``past_key_values`` at
    every step while the real one arrives as ``cache``)."""
    cache = kwargs.pop("cache", None)
    if cache is None or cache is past_key_values:
        return past_key_values
    if past_key_values is not None:
        raise ValueError(f"got two different caches, `past_key_values` ({type(past_key_values).__name__}) and "
                         f"`cache` ({type(cache).__name__}): pass the cache under one name (transformers >= 5.24 "
                         "uses `cache`, earlier versions `past_key_values`)")
    return cache


def check_hidden_states(x, width: int, weight_dtype: torch.dtype, name: str = "hidden_states") -> None:
    """Raise unless ``x`` is a floating tensor ``[B, T, width]`` in ``weight_dtype`` (the layer's
    parameters), or any floating dtype under ``torch.autocast``, which casts at each matmul."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != width:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"`{name}` must have shape [B, T, {width}], got {got}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor, got {x.dtype}")
    if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"`{name}` is {x.dtype} but the weights are {weight_dtype}: cast the module "
                        f"(`.to({x.dtype})`) or the input, or run under `torch.autocast`")


# The tensor whose values the last check read: (weak reference, version, what it was checked for).
# A layer hands a checked mask or ``cu_seqlens`` on to its sublayers (MAC -> attention and memory,
# memory -> short convolutions), which find it here instead of reading it on the host again.
_last_checked: tuple = ()


def _checked_before(t: torch.Tensor, sizes: tuple) -> bool:
    return (not t.is_inference() and bool(_last_checked) and _last_checked[0]() is t
            and _last_checked[1:] == (t._version, sizes))


def _remember(t: torch.Tensor, sizes: tuple) -> None:
    global _last_checked
    _last_checked = () if t.is_inference() else (weakref.ref(t), t._version, sizes)


def check_cu_seqlens(cu_seqlens, hidden_states: torch.Tensor) -> None:
    """Raise unless ``cu_seqlens`` packs the tokens of ``hidden_states`` ``[1, T, ...]``: a 1-D
    integer tensor ``[N + 1]`` on their device, from 0 to T, never decreasing
    (:func:`titans_layers.ops.common.validation.check_cu_seqlens`). Under ``torch.compile`` the
    offsets are not read (no host reads while tracing): type, shape, device and batch size only."""
    B, T = hidden_states.shape[:2]
    sizes = ("cu_seqlens", B, T, hidden_states.device)
    if torch.compiler.is_compiling():
        check_offsets(cu_seqlens, B, T, hidden_states.device, read_offsets=False)
    elif not (isinstance(cu_seqlens, torch.Tensor) and _checked_before(cu_seqlens, sizes)):
        check_offsets(cu_seqlens, B, T, hidden_states.device)
        _remember(cu_seqlens, sizes)


def check_attention_mask(attention_mask, batch_size: int, seq_len: int) -> None:
    """Raise unless ``attention_mask`` is a padding mask ``[B, T_total]`` with ``T_total >= T`` (its
    last T columns belong to this call) holding only 0 (padding) and 1 (token): bool, integer, or
    float with those two values. Under ``torch.compile`` the values are not read."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 \
            or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"`attention_mask` must be a 0/1 padding mask [B, T_total] with T_total >= T (past and "
                         f"new tokens when decoding), B = {batch_size}, T = {seq_len}; got {got}")
    sizes = ("attention_mask", batch_size, seq_len)
    if attention_mask.dtype == torch.bool or torch.compiler.is_compiling() or _checked_before(attention_mask, sizes):
        return
    if attention_mask.dtype.is_complex or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (token), got the values "
                         f"{attention_mask.unique()[:8].tolist()}")
    _remember(attention_mask, sizes)


def check_padding(hidden_states: torch.Tensor, attention_mask, cu_seqlens) -> None:
    """Check the padding arguments of a layer call on ``hidden_states`` ``[B, T, D]`` before anything
    reads them: at most one of a padding ``attention_mask`` (:func:`check_attention_mask`) and
    packed ``cu_seqlens`` (:func:`check_cu_seqlens`)."""
    if attention_mask is not None and cu_seqlens is not None:
        raise ValueError("give `cu_seqlens` (packed sequences) or a padding `attention_mask`, not both")
    if attention_mask is not None:
        check_attention_mask(attention_mask, *hidden_states.shape[:2])
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, hidden_states)
