"""Test set-up: Triton's interpreter when there is no GPU, NaN-poisoned allocations, Hypothesis profiles.

Profiles: ``ci`` (default, fast) and ``thorough`` (local runs): ``HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os

import torch

if not torch.cuda.is_available():
    # must happen before triton is imported (titans_layers imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=10, deadline=None, suppress_health_check=list(HealthCheck),
                          print_blob=True)
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=list(HealthCheck),
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Test tensors are tiny: intra-op threads only add synchronisation (on a busy 2-core CPU,
# milliseconds per small matmul instead of microseconds).
torch.set_num_threads(1)


def _poisoned(factory):
    def make(*args, **kwargs):
        x = factory(*args, **kwargs)
        if x.dtype.is_floating_point:
            x.fill_(float("nan"))
        return x
    return make


@pytest.fixture(autouse=True)
def poison_uninitialised_memory(monkeypatch):
    """Fill every ``torch.empty``-style allocation with NaN, so an element a kernel forgets to
    write fails the comparison instead of passing on leftover memory."""
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))


@pytest.fixture
def device():
    return DEVICE
