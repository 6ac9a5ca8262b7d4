"""What every task hands the trainer: a batch of token ids, per-position targets and token roles."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100  # target of an unlabelled position

# Token roles, for the gate statistics (does the memory's "surprise" fire where it should?).
FILLER, KEY, VALUE, QUERY, ANSWER = 0, 1, 2, 3, 4
ROLE_NAMES = {FILLER: "filler", KEY: "key", VALUE: "value", QUERY: "query", ANSWER: "answer"}


@dataclass
class Batch:
    """A batch of examples, numpy int64 arrays of shape ``[B, T]``.

    ``inputs``: token ids. ``targets``: the token that the logits at each position must predict
    (the next token), ``IGNORE`` where a position is not scored. ``roles``: the role of each input
    token (``FILLER``, ``KEY``, ``VALUE``, ``QUERY``, ``ANSWER``). ``meta``: per-label extras a task
    scores by (e.g. MQAR's key-to-query distance ``[B, T]``, ``-1`` where unlabelled).
    """

    inputs: np.ndarray  # [B, T]
    targets: np.ndarray  # [B, T]
    roles: np.ndarray  # [B, T]
    meta: dict

    def __post_init__(self):
        if self.inputs.shape != self.targets.shape or self.inputs.shape != self.roles.shape:
            raise ValueError(f"`inputs`, `targets` and `roles` must share one shape [B, T], got "
                             f"{self.inputs.shape}, {self.targets.shape}, {self.roles.shape}")


def check_int(name: str, value, low: int = 1) -> int:
    """``value`` as an int >= ``low``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    return int(value)
