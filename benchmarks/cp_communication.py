"""Measure what context parallelism sends per rank per layer: bytes received by each rank in the
forward and in the backward of one layer, counted at the ``torch.distributed`` calls, for two slice
lengths (to show which volumes grow with T). CPU, gloo, 2 processes (forked)::

    python -m benchmarks.cp_communication [--out benchmarks/results/cp_communication.md]

Counted per rank: all_gather: the (R - 1) pieces received; all_reduce: the buffer (a ring moves
about twice that); all_to_all_single: the (R - 1) / R of the buffer that comes from other ranks;
recv: the buffer. Sequences: one sequence spanning both slices (the worst case for state passing).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D, H, K, CONV, WINDOW, SEGMENT, CHUNK = 256, 4, 64, 4, 64, 64, 16
COUNTS = {"fwd": 0, "bwd": 0}
PHASE = ["fwd"]


def _count(nbytes: int) -> None:
    COUNTS[PHASE[0]] += nbytes


def _patch(R: int) -> None:
    all_gather, all_reduce, a2a, recv = dist.all_gather, dist.all_reduce, dist.all_to_all_single, dist.recv

    def g(out, x, *a, **k):
        _count((R - 1) * x.numel() * x.element_size())
        return all_gather(out, x, *a, **k)

    def r(x, *a, **k):
        _count(x.numel() * x.element_size())
        return all_reduce(x, *a, **k)

    def t(out, x, *a, **k):
        _count((R - 1) * x.numel() * x.element_size() // R)
        return a2a(out, x, *a, **k)

    def v(x, *a, **k):
        _count(x.numel() * x.element_size())
        return recv(x, *a, **k)

    dist.all_gather, dist.all_reduce, dist.all_to_all_single, dist.recv = g, r, t, v


def _layers():
    from titans_layers.models import TitansConfig
    from titans_layers.models.mac import MACMixer
    from titans_layers.modules import NeuralMemory, SlidingWindowAttention
    cfg = TitansConfig(vocab_size=16, hidden_size=D, num_hidden_layers=1, num_heads=H, chunk_size=CHUNK,
                       segment_size=SEGMENT, window_size=WINDOW, num_persistent_tokens=4, variant="mac")
    return {
        "NeuralMemory linear, parallel": (lambda: NeuralMemory(D, H, "linear", chunk_size=CHUNK), "auto"),
        "NeuralMemory linear, heads": (lambda: NeuralMemory(D, H, "linear", chunk_size=CHUNK), "heads"),
        "NeuralMemory mlp, sequential": (lambda: NeuralMemory(D, H, "mlp", chunk_size=CHUNK), "auto"),
        "NeuralMemory mlp, heads": (lambda: NeuralMemory(D, H, "mlp", chunk_size=CHUNK), "heads"),
        f"SlidingWindowAttention, window {WINDOW}": (lambda: SlidingWindowAttention(D, H, WINDOW), None),
        f"MAC mixer (linear, segment {SEGMENT})": (lambda: MACMixer(cfg, [0, 1, 2]), None),
    }


def _worker(rank, R, rdzv, lengths, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=R)
    from titans_layers.distributed import build_cp_context
    _patch(R)
    rows = []
    for name, (make, mode) in _layers().items():
        row = [name]
        for n in lengths:
            torch.manual_seed(0)
            layer = make()
            cp = build_cp_context(torch.tensor([0, R * n]), check=False)
            x = torch.randn(1, n, D, requires_grad=True)
            kw = {} if mode is None else {"cp_mode": mode}
            COUNTS.update(fwd=0, bwd=0)
            PHASE[0] = "fwd"
            y = layer(x, cp_context=cp, **kw)[0]
            PHASE[0] = "bwd"
            y.sum().backward()
            row += [COUNTS["fwd"], COUNTS["bwd"]]
        gathered = [None] * R
        dist.all_gather_object(gathered, row)
        rows.append([name] + [max(r[i] for r in gathered) for i in range(1, len(row))])
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def _kib(b: int) -> str:
    return f"{b / 1024:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="256,1024", help="tokens per rank")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    import titans_layers.distributed  # noqa: F401  (inherited by the forked workers)
    import titans_layers.models  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "rdzv"), lengths, out), nprocs=2,
                           start_method="fork")
        rows = torch.load(out)
    head = "| layer (2 ranks, D = 256, H = 4, K = V = 64, Dh = 128) | " + " | ".join(
        f"fwd KiB, n = {n} | bwd KiB, n = {n}" for n in lengths) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(lengths))]
    for r in rows:
        lines.append(f"| {r[0]} | " + " | ".join(_kib(b) for b in r[1:]) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("Bytes received per rank per layer call (max over the 2 ranks), float32; "
                    "`python -m benchmarks.cp_communication`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
