"""Constructor-argument checks shared by the layers."""

from __future__ import annotations


def positive_int(name: str, value) -> int:
    """Return ``value`` if it is an int >= 1, else raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
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
