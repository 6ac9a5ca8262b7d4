"""Train a small Titans model with FSDP2 and context parallelism on the same ranks.

Every rank holds a contiguous slice of one packed batch of sequences (B = 1, ``cu_seqlens``; the
sequences start and end anywhere, some span ranks) and a shard of the parameters (FSDP2
``fully_shard`` per block). Run on 2 CPU processes::

    torchrun --nproc_per_node 2 examples/train_cp_fsdp.py --steps 30

(``--variant mac|mag|mal|lmm|mac_mal``, ``--memory linear|mlp``, ``--tokens`` per step, which the
number of processes must divide; NCCL and one GPU per process when CUDA is available.)

The task: each sequence repeats a random pattern, so the loss falls as the model learns to copy
from earlier in the sequence (across slice edges too). Gradients: every rank's loss is its
tokens' summed cross-entropy over the whole batch's count of targets, so the per-rank gradients
add up to the gradient of the batch mean: FSDP2 sums them (``set_gradient_divide_factor(1.0)``)
instead of averaging (averaging is for data parallelism, where each rank has a whole batch).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titans_layers.distributed import build_cp_context
from titans_layers.models import TitansConfig, TitansForCausalLM

VOCAB = 64


def make_batch(tokens: int, step: int, seed: int = 0):
    """One packed batch ``(ids [1, tokens], cu_seqlens [N + 1])``, the same on every rank (seeded by
    the step): sequences of 5 to 40 tokens, each a random pattern of 2 to 6 tokens repeated."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    ids, cu = [], [0]
    while cu[-1] < tokens:
        n = min(int(torch.randint(5, 41, (1,), generator=g)), tokens - cu[-1])
        pattern = torch.randint(1, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
        ids.append(pattern.repeat(-(-n // pattern.numel()))[:n])
        cu.append(cu[-1] + n)
    return torch.cat(ids)[None], torch.tensor(cu)


def shifted_targets(ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Next-token targets of the whole packed batch ``[1, T]``: -100 at each sequence's last token."""
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    targets[0, cu_seqlens[1:] - 1] = -100
    return targets


def cp_loss(logits: torch.Tensor, targets: torch.Tensor, n_targets: int) -> torch.Tensor:
    """This rank's share of the batch mean cross-entropy: its slice's summed loss over the whole
    batch's number of targets (the shares add up to the mean over all ranks)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction="sum") / n_targets


def small_config(variant: str, memory: str) -> TitansConfig:
    return TitansConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=4, variant=variant,
                        memory=memory, chunk_size=8, segment_size=16, window_size=16, num_persistent_tokens=2,
                        bos_token_id=None, eos_token_id=None, pad_token_id=0, use_cache=False)


def shard(model: TitansForCausalLM, mesh) -> TitansForCausalLM:
    """FSDP2: each block, then the rest; gradients summed over the ranks (context parallelism)."""
    from torch.distributed.fsdp import fully_shard
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
    return model


def train_step(model, optimizer, ids, cu_seqlens, device, cp_group=None) -> float:
    """One step on this rank's slice of the packed batch; returns the batch mean loss (all ranks).
    ``cp_group``: the process group of context parallelism (its own, so that its collectives never
    interleave with the gradient reductions of FSDP / DDP on theirs)."""
    cp = build_cp_context(cu_seqlens, group=cp_group, device=device)
    targets = shifted_targets(ids, cu_seqlens)
    n_targets = int((targets != -100).sum())
    s, e = cp.start, cp.end
    logits = model(ids[:, s:e].to(device), cp_context=cp, use_cache=False).logits  # [1, n, vocab]
    loss = cp_loss(logits, targets[:, s:e].to(device), n_targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=256, help="packed tokens per step (all ranks together)")
    parser.add_argument("--variant", default="mag")
    parser.add_argument("--memory", default="linear")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))  # FSDP2 shards over all ranks
    cp_group = dist.new_group(list(range(world)))  # context parallelism: the same ranks, its own group

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = shard(TitansForCausalLM(small_config(args.variant, args.memory)).to(device).train(), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        ids, cu = make_batch(args.tokens, step, args.seed)
        loss = train_step(model, optimizer, ids, cu, device, cp_group)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  ({len(cu) - 1} sequences, {args.tokens // world} tokens a rank)",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
