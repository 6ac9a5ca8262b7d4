"""Byte-level language modelling on a text present on every machine without a download.

The default corpus is the source of the running interpreter's standard library: its ``*.py`` files
(top level and packages, tests excluded), sorted by path, read as bytes up to ``max_bytes``;
``text_file`` replaces it with any file. The bytes are split by position: the first
``1 - held_out`` fraction trains, the rest is held out. A training example is a random window of
``seq_len + 1`` bytes of the training part (inputs the first ``seq_len``, targets the next byte at
every position); the evaluation reads fixed, evenly spaced windows of the held-out part.

Metrics: held-out bits per byte (mean cross-entropy / ln 2) and the loss by position in the
context (a model that uses its memory predicts later positions better).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from titans_layers.experiments.tasks.base import FILLER, Batch, check_int


def stdlib_bytes(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` bytes of the standard library's ``*.py`` sources (tests excluded), in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages") for p in rel):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    data = b"".join(out)[:max_bytes]
    if len(data) < 1024:
        raise ValueError(f"the standard library at {root} has too little source text ({len(data)} bytes); "
                         "give `text_file`")
    return data


@dataclass(frozen=True)
class ByteLM:
    """Byte-level LM task (see the module docstring). ``sample(batch_size, rng)`` -> a training
    :class:`Batch`; ``held_out_batches(batch_size, num_windows)`` -> evaluation batches."""

    seq_len: int = 256
    text_file: str | None = None
    max_bytes: int = 4_000_000
    held_out: float = 0.1
    _data: np.ndarray = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_int("seq_len", self.seq_len, 2)
        check_int("max_bytes", self.max_bytes, 1024)
        if not 0 < self.held_out < 1:
            raise ValueError(f"`held_out` must be in (0, 1), got {self.held_out!r}")
        if self.text_file is not None:
            path = Path(self.text_file)
            if not path.is_file():
                raise ValueError(f"`text_file` {self.text_file!r} is not a readable file")
            raw = path.read_bytes()[:self.max_bytes]
        else:
            raw = stdlib_bytes(self.max_bytes)
        data = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        split = int(len(data) * (1 - self.held_out))
        if split < self.seq_len + 1 or len(data) - split < self.seq_len + 1:
            raise ValueError(f"the text ({len(data)} bytes) is too short for `seq_len` {self.seq_len} with "
                             f"held_out {self.held_out}")
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_split", split)

    @property
    def vocab(self) -> int:
        return 256

    @property
    def num_bytes(self) -> tuple[int, int]:
        """(training bytes, held-out bytes)."""
        return self._split, len(self._data) - self._split

    def _windows(self, starts: np.ndarray) -> Batch:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        win = self._data[idx]  # [B, T + 1]
        inputs, targets = win[:, :-1].copy(), win[:, 1:].copy()
        return Batch(inputs, targets, np.full(inputs.shape, FILLER, dtype=np.int64), {})

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """Random training windows."""
        B = check_int("batch_size", batch_size)
        starts = rng.integers(0, self._split - self.seq_len - 1, size=B)
        return self._windows(starts)

    def held_out_batches(self, batch_size: int, num_windows: int) -> list[Batch]:
        """``num_windows`` evenly spaced held-out windows in batches of ``batch_size``."""
        check_int("batch_size", batch_size)
        check_int("num_windows", num_windows)
        last = len(self._data) - self.seq_len - 1
        starts = np.linspace(self._split, last, num_windows).astype(np.int64)
        return [self._windows(starts[i:i + batch_size]) for i in range(0, num_windows, batch_size)]
