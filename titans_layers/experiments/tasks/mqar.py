"""Multi-query associative recall (MQAR), as zoology defines it (Arora et al., 2023).

An example of length T with N key-value pairs and vocabulary V:

- the context: N pairs ``k_1 v_1 k_2 v_2 ... k_N v_N`` at positions 0..2N-1, keys drawn without
  replacement from ``[1, V/2)``, values without replacement from ``[V/2, V)``;
- the queries: every key once more, in random order, at positions ``2N + 2 g_i`` after the
  context, where the gaps ``g_i`` are drawn without replacement from ``{0, ..., (T - 2N)/2 - 1}``
  with ``P(g) ∝ (g + 1) ** (a - 1)`` (one gap at a time, each from the law renormalised over the
  gaps left; drawn at once with the Gumbel top-N trick) (zoology's power law, exponent ``power_a``: small ``a``
  puts most queries close to the context, ``a = 1`` is uniform);
- every other position is filler: a token drawn uniformly from ``[0, V)`` (``random_filler``,
  zoology's ``random_non_queries``) or 0;
- the label: only at each query key's position, and it is the key's value (the token that should
  come next); accuracy is over labelled positions.

A query's *distance* is its position minus its key's position: the span a model has to carry the
pair over. Attention with a window shorter than the distance cannot see the pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from titans_layers.experiments.tasks.base import FILLER, IGNORE, KEY, QUERY, VALUE, Batch, check_int


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """``P(g)`` for gaps ``g = 0..space-1``: proportional to ``(g + 1) ** (power_a - 1)`` -> ``[space]``."""
    x = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * x ** (power_a - 1)
    return p / p.sum()


@dataclass(frozen=True)
class MQAR:
    """The MQAR generator (see the module docstring). ``sample(batch_size, rng)`` -> :class:`Batch`
    with ``meta["distance"]`` ``[B, T]`` (-1 where unlabelled)."""

    seq_len: int = 128
    num_kv_pairs: int = 8
    vocab_size: int = 256
    power_a: float = 0.01
    random_filler: bool = True

    def __post_init__(self):
        check_int("seq_len", self.seq_len, 2)
        check_int("num_kv_pairs", self.num_kv_pairs)
        check_int("vocab_size", self.vocab_size, 4)
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"`num_kv_pairs` ({self.num_kv_pairs}) must be at most vocab_size // 2 - 1 "
                             f"({self.vocab_size // 2 - 1}): keys are distinct tokens from [1, V/2)")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"`num_kv_pairs` ({self.num_kv_pairs}) must be at most seq_len / 4 "
                             f"({self.seq_len // 4}): the pairs and their queries must fit in `seq_len`")
        if not (isinstance(self.power_a, (int, float)) and 0 < self.power_a <= 1):
            raise ValueError(f"`power_a` must be in (0, 1], got {self.power_a!r}")

    @property
    def vocab(self) -> int:
        """The vocabulary the model needs."""
        return self.vocab_size

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """``batch_size`` examples drawn with ``rng`` (same generator state -> same batch)."""
        B, T, N, V = check_int("batch_size", batch_size), self.seq_len, self.num_kv_pairs, self.vocab_size
        half = V // 2
        # without replacement, vectorised: the first N of a random permutation per row (uniform), and
        # Gumbel top-N for the gaps (the same law as drawing one gap at a time, each from P
        # renormalised over the gaps left)
        keys = 1 + np.argsort(rng.random((B, half - 1)), axis=1)[:, :N]  # [B, N] from [1, V/2)
        values = half + np.argsort(rng.random((B, V - half)), axis=1)[:, :N]  # [B, N] from [V/2, V)
        space = (T - 2 * N) // 2
        logp = np.log(gap_probabilities(space, self.power_a))
        gumbel = -np.log(-np.log(rng.random((B, space)) + 1e-300) + 1e-300)
        gaps = np.argsort(-(logp[None, :] + gumbel), axis=1)[:, :N]  # [B, N]
        if self.random_filler:
            inputs = rng.integers(0, V, size=(B, T))
        else:
            inputs = np.zeros((B, T), dtype=np.int64)
        targets = np.full((B, T), IGNORE, dtype=np.int64)
        roles = np.full((B, T), FILLER, dtype=np.int64)
        distance = np.full((B, T), -1, dtype=np.int64)
        rows = np.arange(B)[:, None]
        key_pos = 2 * np.arange(N)[None, :].repeat(B, 0)  # [B, N]
        inputs[rows, key_pos], inputs[rows, key_pos + 1] = keys, values
        roles[rows, key_pos], roles[rows, key_pos + 1] = KEY, VALUE
        query_pos = 2 * N + 2 * gaps  # [B, N] query i asks key i
        inputs[rows, query_pos] = keys
        roles[rows, query_pos] = QUERY
        targets[rows, query_pos] = values
        distance[rows, query_pos] = query_pos - key_pos
        return Batch(inputs.astype(np.int64), targets, roles, {"distance": distance})
