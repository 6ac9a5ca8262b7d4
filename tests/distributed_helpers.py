"""Spawning small gloo process groups on CPU for the distributed tests.

A check runs as ``run_group(world_size, fn, *args)``: ``fn(rank, world_size, *args)`` runs in every
process after ``init_process_group("gloo")``; what rank 0 returns comes back (pickled); an exception
on any rank fails the call with that rank's traceback. Batch many checks into one ``fn``: a spawn
costs little: the workers are forked and inherit the parent's imports (import what ``fn``
needs at the test module's top).
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def raised_message(name: str, fn, exc=ValueError) -> str:
    """The message of the ``exc`` that ``fn()`` raises; an AssertionError naming the check if it raises none."""
    try:
        fn()
    except exc as err:
        return str(err)
    raise AssertionError(f"{name} did not raise")


def _worker(rank, world_size, out_dir, fn, args):
    torch.set_num_threads(1)
    # rendezvous through a file (no TCP port to collide with other test runs on the machine)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(("ok", result), os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save(("error", traceback.format_exc()), os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def run_group(world_size: int, fn, *args):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; rank 0's return value."""
    import titans_layers.distributed  # noqa: F401  (imported once here, inherited by the workers)
    import titans_layers.models  # noqa: F401
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            # fork: the workers inherit the parent's imports (a spawned worker re-imports torch, fla and
            # the library, tens of seconds on a loaded 2-core machine)
            mp.start_processes(_worker, args=(world_size, out_dir, fn, args), nprocs=world_size,
                               join=True, start_method="fork")
        except Exception as err:
            msgs = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"{r}.pt")
                if os.path.exists(path):
                    status, payload = torch.load(path, weights_only=False)
                    if status == "error":
                        msgs.append(f"rank {r}:\n{payload}")
            raise AssertionError("\n".join(msgs) or str(err)) from None
        return torch.load(os.path.join(out_dir, "0.pt"), weights_only=False)[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff
