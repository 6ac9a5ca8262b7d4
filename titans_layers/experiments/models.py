"""The experiments' model zoo: every Titans variant with linear and MLP memory, and the baselines,
built at widths that match one parameter budget.

Model names (``--models``):

- ``mac``, ``mag``, ``mal``, ``lmm``, ``mac_mal``: the Titans presets with the linear memory;
  ``<variant>-mlp`` (e.g. ``lmm-mlp``) with the MLP memory.
- ``swa``: sliding-window attention only (every layer a ``"swa"`` block, ``window_size`` tokens).
- ``attn``: full causal attention, built as a ``"swa"`` stack whose window covers the longest
  sequence the run evaluates (a window >= the sequence length is exact causal attention).
- ``gated_deltanet``, ``deltanet``, ``mamba2``: fla's token mixers as ``TitansConfig`` block types.
  fla's kernels are Triton kernels that need CUDA: elsewhere these are skipped, with the reason.

Width matching: every model's ``hidden_size`` is chosen (a multiple of ``2 * num_heads``, head
widths stay even for the rotary embedding) so that its parameter count is closest to the reference
model's at the base width (``match_to``, default the first model asked for); the MLP is always
``4 * hidden_size`` wide so that the count moves smoothly with the width. The report lists every
model's width, count and ratio to the reference (within 10% is the goal; a miss is flagged).

Options that ``TitansConfig`` does not hold are applied to every memory layer after the model is
built (``MEMORY_OPTIONS``): the gates' initial values ``alpha_init`` (forget), ``eta_init``
(momentum) and ``theta_init`` (step size as a fraction of ``max_step_size``), all set through the
gate projections' biases.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch

from titans_layers.models import TitansConfig, TitansForCausalLM
from titans_layers.models.configuration_titans import FLA_BLOCKS, VARIANTS
from titans_layers.modules import NeuralMemory

BASELINES = ("swa", "attn")
MODEL_NAMES = tuple(VARIANTS) + tuple(f"{v}-mlp" for v in VARIANTS) + BASELINES + FLA_BLOCKS
MEMORY_OPTIONS = ("alpha_init", "eta_init", "theta_init")
# The base model: small enough to train on two CPU cores in minutes.
BASE_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, chunk_size=16, segment_size=32,
                   window_size=16, num_persistent_tokens=4)
CONFIG_KEYS = tuple(k for k in inspect.signature(TitansConfig.__init__).parameters if k not in ("self", "kwargs"))


def cuda_available() -> bool:
    return torch.cuda.is_available()


def skip_reason(name: str, device: str) -> str | None:
    """Why ``name`` cannot run on ``device``, or None when it can."""
    if name not in MODEL_NAMES:
        raise ValueError(f"`--models`: unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if name in FLA_BLOCKS and not str(device).startswith("cuda"):
        return f"fla's {name} kernels are Triton kernels that need CUDA; this run is on {device}"
    return None


def model_overrides(name: str, max_len: int) -> dict:
    """The ``TitansConfig`` fields that define model ``name`` (``max_len``: the longest sequence it sees)."""
    if name in FLA_BLOCKS:
        return {"block_types": [name]}
    if name == "swa":
        return {"block_types": ["swa"]}
    if name == "attn":
        return {"block_types": ["swa"], "window_size": max_len}
    variant, _, memory = name.partition("-")
    return {"variant": variant, "memory": memory or "linear"}


@dataclass
class BuiltModel:
    """A model ready to train: the module, its config, its width and parameter count."""

    name: str
    model: TitansForCausalLM
    config: TitansConfig
    hidden_size: int
    params: int


def _config(name: str, vocab: int, max_len: int, hidden_size: int, options: dict) -> TitansConfig:
    kw = {**BASE_CONFIG, **{k: v for k, v in options.items() if k not in MEMORY_OPTIONS}}
    kw.update(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=4 * hidden_size)
    spec = model_overrides(name, max_len)
    layers = kw["num_hidden_layers"]
    if "block_types" in spec:
        kw["block_types"] = spec["block_types"] * layers
        kw.pop("variant", None)
        if "window_size" in spec:
            kw["window_size"] = max(spec["window_size"], kw["window_size"])
    else:
        kw.update(spec)
        kw.pop("block_types", None)
    return TitansConfig(**kw)


def count_params(name: str, vocab: int, max_len: int, hidden_size: int, options: dict) -> int:
    """Parameters of model ``name`` at ``hidden_size`` (built on the meta device: no memory, no time)."""
    config = _config(name, vocab, max_len, hidden_size, options)
    with torch.device("meta"):
        model = TitansForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def _width_candidates(options: dict) -> range:
    step = 2 * options.get("num_heads", BASE_CONFIG["num_heads"])
    base = options.get("hidden_size", BASE_CONFIG["hidden_size"])
    return range(step, 4 * base + step, step)


def matched_width(name: str, vocab: int, max_len: int, target: int, options: dict) -> int:
    """The ``hidden_size`` (a multiple of ``2 * num_heads``) whose parameter count is closest to ``target``.

    With the MLP at ``4 * hidden_size`` and the head count fixed, every count is a quadratic in
    the width: it is fitted on three widths, the candidates are ranked by the fit, and the best
    few are counted exactly."""
    cands = list(_width_candidates(options))
    probe = [cands[len(cands) // 4], cands[len(cands) // 2], cands[-1]]
    coef = np.polyfit(probe, [count_params(name, vocab, max_len, d, options) for d in probe], 2)
    ranked = sorted(cands, key=lambda d: abs(math.log(max(np.polyval(coef, d), 1.0) / target)))[:3]
    return min(ranked, key=lambda d: abs(math.log(count_params(name, vocab, max_len, d, options) / target)))


def apply_memory_options(model: torch.nn.Module, options: dict) -> None:
    """Set the options of ``MEMORY_OPTIONS`` found in ``options`` on every ``NeuralMemory`` of ``model``."""
    for key in ("alpha_init", "eta_init", "theta_init"):
        if key in options and not 0.0 < float(options[key]) < 1.0:
            raise ValueError(f"`{key}` must be in (0, 1), got {options[key]!r}")
    for module in model.modules():
        if not isinstance(module, NeuralMemory):
            continue
        for key, proj in (("alpha_init", module.alpha_proj), ("eta_init", module.eta_proj),
                          ("theta_init", module.theta_proj)):
            if key in options:
                p = float(options[key])
                with torch.no_grad():
                    proj.bias.fill_(math.log(p / (1 - p)))


def build_model(name: str, vocab: int, max_len: int, options: dict, hidden_size: int | None = None,
                seed: int = 0) -> BuiltModel:
    """Build model ``name`` for a task with ``vocab`` tokens and sequences up to ``max_len``.

    ``options``: ``TitansConfig`` fields and ``MEMORY_OPTIONS`` (a ``--set`` grid point) on top of
    ``BASE_CONFIG``; ``hidden_size`` overrides the width (the matched one); ``seed`` seeds the
    initialisation.
    """
    width = hidden_size or options.get("hidden_size", BASE_CONFIG["hidden_size"])
    config = _config(name, vocab, max_len, width, options)
    torch.manual_seed(seed)
    model = TitansForCausalLM(config)
    apply_memory_options(model, options)
    return BuiltModel(name, model, config, width, sum(p.numel() for p in model.parameters()))


def memory_layers(model: torch.nn.Module) -> list[tuple[str, NeuralMemory]]:
    """``(name, layer)`` of every ``NeuralMemory`` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NeuralMemory)]
