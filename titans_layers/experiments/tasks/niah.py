"""Single-needle retrieval (needle in a haystack, NIAH).

Vocabulary (``vocab_size`` V >= 32): 0 = zero filler, 1 = needle marker ``N``, 2 = question marker
``Q``, 3..12 = the ten digits, ``[13, 13 + num_keys)`` = keys, the rest ``[13 + num_keys, V)`` =
haystack noise.

An example of length T: a haystack of T - (value_len + 2) tokens, with the needle
``N key d_1 .. d_m`` (m = ``value_len`` digits) planted so that it starts at position
``round(depth * (T_haystack - m - 2))``, then the question and answer ``Q key d_1 .. d_m`` at the
end. Labels: at the question's key predict ``d_1``, at ``d_i`` predict ``d_{i+1}`` (the answer is
teacher-forced, as in recall tasks); an example counts as retrieved when every digit is right.

The haystack is ``"pattern"`` (one fixed noise sequence of ``pattern_len`` tokens, the same for
every example and seed, repeated: the classic "the grass is green" filler, easy to predict and to
ignore) or ``"random"`` (noise tokens drawn uniformly). ``depth=None`` draws the depth uniformly
per example (training); a float fixes it (the evaluation grid of lengths x depths).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from titans_layers.experiments.tasks.base import ANSWER, FILLER, IGNORE, KEY, QUERY, VALUE, Batch, check_int

NEEDLE, QUESTION, DIGIT0, KEY0 = 1, 2, 3, 13
HAYSTACKS = ("pattern", "random")


@dataclass(frozen=True)
class NIAH:
    """The NIAH generator (see the module docstring). ``sample(batch_size, rng, seq_len=None,
    depth=None)`` -> :class:`Batch` with ``meta["depth"]`` ``[B]`` (the needle's relative depth)
    and ``meta["needle_pos"]`` ``[B]``."""

    seq_len: int = 256
    vocab_size: int = 64
    value_len: int = 4
    num_keys: int = 16
    haystack: str = "pattern"
    pattern_len: int = 7

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size, KEY0 + self.num_keys + 1)
        check_int("value_len", self.value_len)
        check_int("num_keys", self.num_keys)
        check_int("pattern_len", self.pattern_len)
        check_int("seq_len", self.seq_len, 2 * (self.value_len + 2) + 1)
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"`haystack` must be one of {HAYSTACKS}, got {self.haystack!r}")

    @property
    def vocab(self) -> int:
        return self.vocab_size

    def pattern(self) -> np.ndarray:
        """The fixed haystack pattern ``[pattern_len]`` (seeded by the task's settings, not the run's)."""
        rng = np.random.default_rng(12345)
        return rng.integers(KEY0 + self.num_keys, self.vocab_size, size=self.pattern_len)

    def sample(self, batch_size: int, rng: np.random.Generator, seq_len: int | None = None,
               depth: float | None = None) -> Batch:
        """``batch_size`` examples of ``seq_len`` (default the task's) tokens, the needle at ``depth``
        in [0, 1] (None: uniform per example)."""
        B = check_int("batch_size", batch_size)
        T = self.seq_len if seq_len is None else check_int("seq_len", seq_len, 2 * (self.value_len + 2) + 1)
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"`depth` must be in [0, 1] or None, got {depth!r}")
        m = self.value_len
        hay_len = T - (m + 2)
        if self.haystack == "pattern":
            pat = self.pattern()
            offsets = rng.integers(0, self.pattern_len, size=B)  # [B] phase of the pattern
            idx = (offsets[:, None] + np.arange(T)[None, :]) % self.pattern_len
            inputs = pat[idx]  # [B, T]
        else:
            inputs = rng.integers(KEY0 + self.num_keys, self.vocab_size, size=(B, T))
        depths = rng.random(B) if depth is None else np.full(B, float(depth))
        needle_pos = np.rint(depths * (hay_len - m - 2)).astype(np.int64)  # [B]
        keys = rng.integers(KEY0, KEY0 + self.num_keys, size=B)  # [B]
        digits = rng.integers(0, 10, size=(B, m)) + DIGIT0  # [B, m]
        roles = np.full((B, T), FILLER, dtype=np.int64)
        targets = np.full((B, T), IGNORE, dtype=np.int64)
        rows = np.arange(B)
        inputs[rows, needle_pos], inputs[rows, needle_pos + 1] = NEEDLE, keys
        roles[rows, needle_pos], roles[rows, needle_pos + 1] = KEY, KEY
        value_pos = needle_pos[:, None] + 2 + np.arange(m)[None, :]  # [B, m]
        inputs[rows[:, None], value_pos] = digits
        roles[rows[:, None], value_pos] = VALUE
        q = hay_len  # question marker position
        inputs[:, q], inputs[:, q + 1] = QUESTION, keys
        roles[:, q], roles[:, q + 1] = QUERY, QUERY
        inputs[:, q + 2:q + 2 + m] = digits
        roles[:, q + 2:q + 2 + m] = ANSWER
        targets[:, q + 1:q + 1 + m] = digits  # the key predicts d_1, d_i predicts d_{i+1}
        return Batch(inputs.astype(np.int64), targets, roles, {"depth": depths, "needle_pos": needle_pos})
