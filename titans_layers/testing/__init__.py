"""The SPEC §1 contract as a reusable test kit. The Hypothesis parts (:func:`op_cases`,
:func:`verify_op` and its wrappers) need the ``test`` extra; the rest needs only torch.

- :mod:`.cases`: op inputs drawn from a seed (:class:`OpCase`, :func:`make_case`).
- :mod:`.strategies`: Hypothesis strategies for op inputs and states (:func:`op_cases`).
- :mod:`.compare`: the relative-error comparison and the SPEC tolerances.
- :mod:`.clipping`: how far a case's writes sit from the update-clipping bound, where the
  gradient jumps (clipping tests draw cases clear of it).
- :mod:`.contract`: one check per promise, and :func:`verify_momentum_delta_rule` /
  :func:`verify_mlp_memory`, which run them all against a candidate implementation.
"""

from titans_layers.testing.compare import assert_close, relative_error, tolerance
from titans_layers.testing.contract import (check_against_reference, check_continuation, check_deterministic,
                                            check_errors, check_varlen, malformed_calls, verify_mlp_memory,
                                            verify_momentum_delta_rule, verify_op)
from titans_layers.testing.cases import GATE_PATTERNS, OpCase, make_case, pin_gates



def __getattr__(name):
    if name == "op_cases":  # imports hypothesis
        from titans_layers.testing.strategies import op_cases
        return op_cases
    raise AttributeError(f"module 'titans_layers.testing' has no attribute {name!r}")


__all__ = [
    "GATE_PATTERNS",
    "OpCase",
    "assert_close",
    "check_against_reference",
    "check_continuation",
    "check_deterministic",
    "check_errors",
    "check_varlen",
    "make_case",
    "malformed_calls",
    "op_cases",
    "pin_gates",
    "relative_error",
    "tolerance",
    "verify_mlp_memory",
    "verify_momentum_delta_rule",
    "verify_op",
]
