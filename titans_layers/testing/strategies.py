"""Hypothesis strategies for memory-update op inputs and states.

Hypothesis draws the sizes, dtype, chunk size, gate extremes, state kind, split point and a seed;
the tensors are then drawn from that seed with torch (:func:`make_case`), so a failing example
shrinks to small sizes and replays exactly.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from titans_layers.testing.cases import OpCase, make_case


@st.composite
def op_cases(draw, *, dtypes=(torch.float32,), chunk_sizes=(1, 2, 3, 16), max_T: int = 80, max_B: int = 2,
             max_H: int = 2, max_dim: int = 40, varlen: bool | None = False, family: str = "linear",
             activations=("silu", "gelu"), device="cpu") -> OpCase:
    """Strategy for :class:`OpCase`: odd sizes, gates at 0 and 1, every state kind, split points;
    for ``family="mlp"`` also the hidden width, activation and residual.

    ``varlen``: False (no packing), True (always packed) or None (either).
    """
    packed = draw(st.booleans()) if varlen is None else varlen
    dtype = draw(st.sampled_from(dtypes))
    chunk_size = draw(st.sampled_from(chunk_sizes))
    H = draw(st.integers(1, max_H))
    K = draw(st.integers(2, max_dim))  # a 1-element head makes norm-relative errors a single scalar's
    V = draw(st.integers(2, max_dim))
    options = {}
    if family == "mlp":
        options = dict(hidden=draw(st.integers(2, 2 * max_dim)), activation=draw(st.sampled_from(activations)),
                       residual=draw(st.booleans()))
        if options["residual"]:
            V = K
    lengths = None
    if packed:
        lengths = draw(st.lists(st.integers(0, max_T // 2), min_size=1, max_size=4))
        B, T = 1, sum(lengths)
    else:
        B = draw(st.integers(1, max_B))
        T = draw(st.integers(0, max_T))
    kinds = ["none", "M", "MS", "shared"] if family == "linear" else ["M", "MS", "shared"]
    state = draw(st.sampled_from(kinds))
    extremes = draw(st.sampled_from([0.0, 0.1, 0.5]))
    split = draw(st.integers(0, T))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return make_case(seed=seed, B=B, T=T, H=H, K=K, V=V, dtype=dtype, chunk_size=chunk_size, extremes=extremes,
                     state=state, lengths=lengths, split=split, family=family, device=device, **options)
