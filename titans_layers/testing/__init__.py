"""The SPEC §1 contract as a reusable test kit (needs the ``test`` extra: pytest, hypothesis).

- :mod:`.strategies`: Hypothesis strategies for op inputs and states (:func:`op_cases`, :func:`make_case`).
- :mod:`.compare`: the relative-error comparison and the SPEC tolerances.
- :mod:`.contract`: one check per promise, and :func:`verify_momentum_delta_rule`, which runs
  them all against a candidate implementation.
"""

from titans_layers.testing.compare import assert_close, relative_error, tolerance
from titans_layers.testing.contract import (check_against_reference, check_continuation, check_deterministic,
                                            check_errors, check_varlen, malformed_calls, verify_momentum_delta_rule)
from titans_layers.testing.strategies import OpCase, make_case, op_cases

__all__ = [
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
    "relative_error",
    "tolerance",
    "verify_momentum_delta_rule",
]
