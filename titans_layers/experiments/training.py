"""The training loop: AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast
on CUDA, fixed seeds, optional early stop at a target accuracy, a tqdm bar (step, loss, accuracy,
tokens/s), and Ctrl-C ending the run cleanly with what it has (``interrupted = True``).

The loss is the cross-entropy over the labelled positions of a batch (``Batch.targets``); the
accuracy shown is the training batch's (labelled positions), the early stop reads the
validation accuracy measured every ``eval_every`` steps on fixed held-out batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from titans_layers.experiments.evaluation import EVAL_SEED_OFFSET, autocast, predict
from titans_layers.experiments.tasks.base import IGNORE

TRAIN_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "seed", "eval_every",
              "target_accuracy", "memory_lr_scale")


@dataclass
class TrainConfig:
    """Optimiser and loop settings.

    steps, batch_size, lr (peak), weight_decay (AdamW, on matrices and embeddings only), warmup
    (fraction of ``steps`` with a linear ramp, then cosine decay to 10% of ``lr``), grad_clip
    (global norm), seed (initialisation and data), eval_every (validation period in steps; 0 = only
    at the end), target_accuracy (stop early once the validation accuracy reaches it; None = never),
    memory_lr_scale (multiplies the learning rate of the memory layers' gate projections and
    initial memories).
    """

    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    target_accuracy: float | None = None
    memory_lr_scale: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {v!r}")
        for name in ("lr", "grad_clip", "memory_lr_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {v!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"`warmup` must be a fraction in [0, 1), got {self.warmup!r}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ValueError(f"`target_accuracy` must be in (0, 1], got {self.target_accuracy!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a training run leaves: ``curve`` (one dict per logged step: step, loss, accuracy, lr,
    and ``val_accuracy`` where measured), ``steps`` done, ``interrupted``, ``early_stopped``,
    ``diverged_at`` (the step whose loss was not finite; training stops there), ``wall_s``,
    ``tokens_per_s``."""

    curve: list = field(default_factory=list)
    steps: int = 0
    interrupted: bool = False
    early_stopped: bool = False
    diverged_at: int | None = None
    wall_s: float = 0.0
    tokens_per_s: float = 0.0


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to 0.1."""
    w = max(1, int(round(warmup * steps)))
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, steps - w)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: decay on matrices and embeddings (ndim >= 2), none on vectors (norms, biases);
    the memory's gate projections and initial memories at ``lr * memory_lr_scale``."""
    groups = {}
    for name, p in model.named_parameters():
        memory_part = ".memory." in name and any(s in name for s in ("alpha_proj", "eta_proj", "theta_proj",
                                                                       "init_M", "init_W"))
        decay = p.ndim >= 2 and "init_" not in name
        key = (decay, memory_part)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
             "lr_scale": cfg.memory_lr_scale if memory_part else 1.0} for (decay, memory_part), ps in groups.items()]


def batch_loss(model, batch, device) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over labelled positions and the batch accuracy there."""
    x = torch.as_tensor(batch.inputs, device=device)
    y = torch.as_tensor(batch.targets, device=device)
    with autocast(device):
        logits = model(input_ids=x, use_cache=False).logits  # [B, T, V]
    logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    with torch.no_grad():
        mask = y != IGNORE
        acc = (logits.argmax(-1)[mask] == y[mask]).float().mean().item() if mask.any() else float("nan")
    return loss, acc


def validation_accuracy(model, task, device, seed: int, batches: int = 2, batch_size: int = 64) -> float:
    """Accuracy over the labelled positions of fixed held-out batches (same for every call)."""
    rng = np.random.default_rng(seed + EVAL_SEED_OFFSET - 1)
    was = model.training
    model.eval()
    right = total = 0
    held_out = task.held_out_batches(batch_size, batches * batch_size) if hasattr(task, "held_out_batches") else None
    for i in range(batches):
        b = held_out[i] if held_out is not None else task.sample(batch_size, rng)
        pred, _ = predict(model, b, device)
        mask = b.targets != IGNORE
        right += int((pred[mask] == b.targets[mask]).sum())
        total += int(mask.sum())
    model.train(was)
    return right / max(1, total)


def train(model: torch.nn.Module, task, cfg: TrainConfig, device: torch.device, desc: str = "",
          progress: bool = True, position: int = 0, should_stop=None) -> TrainResult:
    """Train ``model`` on ``task`` (anything with ``sample(batch_size, rng) -> Batch``) for
    ``cfg.steps`` steps. Returns a :class:`TrainResult`; a ``KeyboardInterrupt`` (or
    ``should_stop()`` turning true, checked every step) ends the loop and is reported in it
    (``interrupted``), not raised."""
    from tqdm.auto import tqdm
    model.to(device).train()
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    rng = np.random.default_rng(cfg.seed)
    result = TrainResult()
    bar = tqdm(total=cfg.steps, desc=desc, position=position, leave=True, disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    t0, tokens, loss_avg, acc_avg = time.perf_counter(), 0, None, None
    log_every = max(1, cfg.steps // 100)
    try:
        for step in range(cfg.steps):
            if should_stop is not None and should_stop():
                result.interrupted = True
                break
            f = lr_factor(step, cfg.steps, cfg.warmup)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * f * g["lr_scale"]
            batch = task.sample(cfg.batch_size, rng)
            loss, acc = batch_loss(model, batch, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tokens += batch.inputs.size
            lv = loss.item()
            if not math.isfinite(lv):  # diverged: stop, the report says where
                result.diverged_at = step + 1
                break
            loss_avg = lv if loss_avg is None else 0.9 * loss_avg + 0.1 * lv
            acc_avg = acc if acc_avg is None else 0.9 * acc_avg + 0.1 * acc
            result.steps = step + 1
            point = None
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                point = {"step": step + 1, "loss": lv, "accuracy": acc, "lr": cfg.lr * f}
                result.curve.append(point)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                val = validation_accuracy(model, task, device, cfg.seed)
                if point is None:
                    point = {"step": step + 1, "loss": lv, "accuracy": acc, "lr": cfg.lr * f}
                    result.curve.append(point)
                point["val_accuracy"] = val
                if cfg.target_accuracy is not None and val >= cfg.target_accuracy:
                    result.early_stopped = True
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"loss {loss_avg:.3f} acc {acc_avg:.3f} tok/s {tokens / max(elapsed, 1e-9):,.0f}",
                                refresh=False)
            bar.update(1)
            if result.early_stopped:
                break
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        bar.close()
    result.wall_s = time.perf_counter() - t0
    result.tokens_per_s = tokens / max(result.wall_s, 1e-9)
    model.eval()
    return result
