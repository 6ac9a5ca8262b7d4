"""Scoring trained models: the per-task metrics of the report.

- ``mqar``: accuracy over labelled positions at the training load, by key-to-query distance
  (bins with power-of-two edges), and by load (number of pairs) at the same length.
- ``niah``: per length x depth, the fraction of examples whose every digit is right
  (``accuracy``) and the fraction of digits right (``digit_accuracy``).
- ``lm``: held-out bits per byte, next-byte accuracy and the loss by position in the context.

Every evaluation draws its examples from its own generator seeded by the run's seed, so two
models of one run see the same examples.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from titans_layers.experiments.tasks.base import IGNORE, Batch

EVAL_SEED_OFFSET = 1_000_003  # evaluation data never coincides with the training stream


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU runs in float32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def predict(model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per-position predictions and losses ``([B, T] argmax, [B, T] cross-entropy in nats; 0 where unlabelled)``."""
    x = torch.as_tensor(batch.inputs, device=device)
    y = torch.as_tensor(batch.targets, device=device)
    with autocast(device):
        logits = model(input_ids=x, use_cache=False).logits  # [B, T, V]
    logits = logits.float()
    loss = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")  # [B, T]
    return logits.argmax(-1).cpu().numpy(), loss.cpu().numpy()


def distance_edges(seq_len: int) -> list[int]:
    """Bin edges of key-to-query distances: 1, 16, 32, 64, ... up to and past ``seq_len``."""
    edges = [1, 16]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 2)
    return edges


def evaluate_mqar(model, task, device, seed: int, num_examples: int = 256, batch_size: int = 64,
                  loads: list[int] | None = None) -> dict:
    """MQAR metrics: ``accuracy`` (training load), ``accuracy_by_distance`` (bin -> {accuracy,
    count}), ``accuracy_by_load`` (pairs -> accuracy)."""
    from titans_layers.experiments.tasks.mqar import MQAR
    model.eval()
    metrics = {}
    loads = sorted(set(loads or []) | {task.num_kv_pairs})
    by_load, edges = {}, distance_edges(task.seq_len)
    for load in loads:
        t = MQAR(task.seq_len, load, task.vocab_size, task.power_a, task.random_filler)
        rng = np.random.default_rng(seed + EVAL_SEED_OFFSET + load)
        correct, dist = [], []
        for start in range(0, num_examples, batch_size):
            b = t.sample(min(batch_size, num_examples - start), rng)
            pred, _ = predict(model, b, device)
            mask = b.targets != IGNORE
            correct.append((pred[mask] == b.targets[mask]))
            dist.append(b.meta["distance"][mask])
        correct, dist = np.concatenate(correct), np.concatenate(dist)
        by_load[load] = float(correct.mean())
        if load == task.num_kv_pairs:
            metrics["accuracy"] = float(correct.mean())
            bins = {}
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = (dist >= lo) & (dist < hi)
                if sel.any():
                    bins[f"{lo}-{hi - 1}"] = {"accuracy": float(correct[sel].mean()), "count": int(sel.sum())}
            metrics["accuracy_by_distance"] = bins
    metrics["accuracy_by_load"] = {str(k): v for k, v in by_load.items()}
    return metrics


def evaluate_niah(model, task, device, seed: int, lengths: list[int], depths: list[float],
                  num_examples: int = 16, batch_size: int = 8, max_tokens_per_batch: int = 65536) -> dict:
    """NIAH metrics: ``accuracy`` / ``digit_accuracy`` as ``{length: {depth: value}}``, plus the mean
    ``accuracy`` over the grid at the training length (``accuracy_train_length``)."""
    model.eval()
    acc, digit, errors = {}, {}, {}
    for T in lengths:
        try:
            acc[str(T)], digit[str(T)] = _niah_length(model, task, device, seed, T, depths, num_examples,
                                                      max(1, min(batch_size, max_tokens_per_batch // T)))
        except (RuntimeError, MemoryError) as exc:  # e.g. out of memory at the longest lengths: skip that length
            errors[str(T)] = f"{type(exc).__name__}: {str(exc)[:200]}"
    train = acc.get(str(task.seq_len))
    return {"accuracy": acc, "digit_accuracy": digit, "errors": errors,
            "accuracy_train_length": float(np.mean(list(train.values()))) if train else None}


def _niah_length(model, task, device, seed, T, depths, num_examples, bs) -> tuple[dict, dict]:
    """NIAH accuracy and digit accuracy at length ``T`` per depth."""
    acc, digit = {}, {}
    for depth in depths:
        rng = np.random.default_rng(seed + EVAL_SEED_OFFSET + T)
        ok, dig = [], []
        for start in range(0, num_examples, bs):
            b = task.sample(min(bs, num_examples - start), rng, seq_len=T, depth=depth)
            pred, _ = predict(model, b, device)
            mask = b.targets != IGNORE
            right = (pred == b.targets) | ~mask  # [B, T]
            ok.append(right.all(axis=1))
            dig.append((pred[mask] == b.targets[mask]))
        acc[f"{depth:g}"] = float(np.concatenate(ok).mean())
        digit[f"{depth:g}"] = float(np.concatenate(dig).mean())
    return acc, digit


def evaluate_lm(model, task, device, num_windows: int = 64, batch_size: int = 16, position_bins: int = 8) -> dict:
    """LM metrics: ``bits_per_byte``, ``accuracy`` (next byte) on held-out windows and
    ``loss_by_position`` (bin start -> mean nats)."""
    model.eval()
    losses, correct = [], []
    for b in task.held_out_batches(batch_size, num_windows):
        pred, loss = predict(model, b, device)
        losses.append(loss)
        correct.append(pred == b.targets)
    loss = np.concatenate(losses)  # [N, T]
    T = loss.shape[1]
    width = max(1, T // position_bins)
    by_pos = {str(s): float(loss[:, s:s + width].mean()) for s in range(0, T, width)}
    return {"bits_per_byte": float(loss.mean() / math.log(2)), "loss": float(loss.mean()),
            "accuracy": float(np.concatenate(correct).mean()), "loss_by_position": by_pos}
