"""Gate statistics of the memory layers: what the trained gates do, token by token.

For every ``NeuralMemory`` of a model, over one evaluation batch:

- the distributions of ``alpha`` (forget), ``eta`` (momentum) and ``theta`` (step size) over all
  tokens and heads (quantiles and a histogram);
- the mean of each gate by token role (key, value, query, filler, ...), i.e. whether the step
  size ("momentary surprise") fires at the tokens that must be stored rather than at filler;
- the memory's norm over positions (``||W_t||_F`` averaged over sequences and heads, at every
  chunk boundary; for the MLP memory the norm of ``(W1, W2)`` together).

The gates are caught with forward hooks on the gate projections (so MAC's per-segment calls are
seen in order and concatenated); the memory norm replays the stream the layer wrote (caught by a
hook on its input) chunk by chunk with a private cache, which continues the state exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from titans_layers.experiments.models import memory_layers
from titans_layers.experiments.tasks.base import ROLE_NAMES
from titans_layers.models.mac import LayerStates

GATES = ("alpha", "eta", "theta")
HIST_BINS = 40


def _gate_value(layer, gate: str, logits: torch.Tensor) -> torch.Tensor:
    g = torch.sigmoid(logits.float())
    return layer.max_step_size * g if gate == "theta" else g


@torch.no_grad()
def memory_norms(layer, stream: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Replay ``stream`` ``[B, T, D]`` (what ``layer`` wrote) chunk by chunk: the positions of the
    chunk ends ``[n]`` and the mean memory norm after each ``[n]``."""
    cache = LayerStates()
    C, T = layer.chunk_size, stream.shape[1]
    ends, norms = [], []
    for s in range(0, T, C):
        layer(stream[:, s:s + C], past_key_values=cache, use_cache=True)
        weights = layer.memory_weights(cache[layer.layer_idx]["recurrent_state"])
        sq = sum(w.float().pow(2).sum(dim=tuple(range(2, w.ndim))) for w in weights)  # [B, H]
        ends.append(min(s + C, T))
        norms.append(float(sq.sqrt().mean()))
    return np.array(ends), np.array(norms)


@torch.no_grad()
def gate_statistics(model: torch.nn.Module, inputs: torch.Tensor, roles: np.ndarray) -> list[dict]:
    """Gate statistics of every memory layer of ``model`` on ``inputs`` ``[B, T]`` (roles ``[B, T]``).

    Returns one dict per memory layer: ``layer`` (module name), per gate ``quantiles`` (5, 25, 50,
    75, 95 %), ``hist`` (counts over ``HIST_BINS`` bins of [0, max]), ``mean_by_role``
    (role -> mean), and ``norm_positions`` / ``norm`` (memory norm over positions).
    """
    layers = memory_layers(model)
    if not layers:
        return []
    caught = {name: {g: [] for g in GATES} | {"stream": []} for name, _ in layers}
    handles = []
    for name, layer in layers:
        for gate in GATES:
            proj = getattr(layer, f"{gate}_proj")
            handles.append(proj.register_forward_hook(
                lambda mod, args, out, name=name, gate=gate, layer=layer:
                caught[name][gate].append(_gate_value(layer, gate, out))))
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: caught[name]["stream"].append(
                (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for name, layer in layers:
        entry = {"layer": name, "max_step_size": layer.max_step_size}
        for gate in GATES:
            g = torch.cat(caught[name][gate], dim=1).cpu().numpy()  # [B, T, H]
            flat = g.reshape(-1)
            # theta on [0, max_step_size], eta on [0, 1]; alpha sits near 0 (forget ~ 0.01): up to its max
            hi = {"theta": layer.max_step_size, "eta": 1.0}.get(gate, max(1e-4, float(flat.max())))
            entry[gate] = {
                "quantiles": dict(zip(("p05", "p25", "p50", "p75", "p95"),
                                      np.quantile(flat, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist())),
                "mean": float(flat.mean()),
                "hist": np.histogram(flat, bins=HIST_BINS, range=(0.0, hi))[0].tolist(),
                "hist_range": [0.0, hi],
                "mean_by_role": {ROLE_NAMES[r]: float(g[roles == r].mean()) for r in np.unique(roles)},
            }
        stream = torch.cat(caught[name]["stream"], dim=1)  # [B, T, D]
        layer.eval()
        ends, norms = memory_norms(layer, stream)
        entry["norm_positions"], entry["norm"] = ends.tolist(), norms.tolist()
        out.append(entry)
    return out
