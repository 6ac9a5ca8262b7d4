"""Training steps under context parallelism with DDP and with FSDP2 (``fully_shard`` per block) on 2
gloo ranks equal one process on the whole packed batch, for every model variant and both
memories; and the recipe ``examples/train_cp_fsdp.py`` runs.

A step: the batch mean next-token loss (targets shifted over the whole batch, the recipe's
``cp_loss``), backward, one SGD step. Compared: the loss and the parameter update (all parameters as
one vector, relative error <= 1e-5).
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
import torch.distributed as dist

from tests.distributed_helpers import rel_err, run_group

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5
CU = [0, 3, 17, 24]  # slice edge at 12: inside a sequence, a memory chunk (4) and a MAC segment (5)
# every variant under each wrapper, the memories alternating
STEPS = [("ddp", v, m) for v, m in (("mac", "linear"), ("mag", "mlp"), ("mal", "linear"), ("lmm", "mlp"),
                                     ("mac_mal", "linear"))] + \
        [("fsdp", v, m) for v, m in (("mac", "mlp"), ("mag", "linear"), ("mal", "mlp"), ("lmm", "linear"),
                                     ("mac_mal", "mlp"))]


def _recipe():
    spec = importlib.util.spec_from_file_location("train_cp_fsdp", ROOT / "examples" / "train_cp_fsdp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sum_hook(state, bucket):
    """DDP comm hook: sum the gradients over the ranks (context parallelism), do not average."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def _steps(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.model_helpers import tiny_config
    from titans_layers.distributed import build_cp_context
    from titans_layers.models import TitansForCausalLM

    recipe = _recipe()
    mesh = init_device_mesh("cpu", (world_size,))
    cp_group = dist.new_group(list(range(world_size)))
    cu = torch.tensor(CU)
    ids = torch.randint(1, 100, (1, CU[-1]), generator=torch.Generator().manual_seed(3))
    targets = recipe.shifted_targets(ids, cu)
    n_targets = int((targets != -100).sum())
    out = {}
    for wrapper, variant, memory in STEPS:
        torch.manual_seed(0)
        model = TitansForCausalLM(tiny_config(variant, memory)).train()
        ref = copy.deepcopy(model)
        before = torch.cat([p.detach().flatten() for p in ref.parameters()])
        # one process, the whole batch
        logits = ref(ids, cu_seqlens=cu, use_cache=False).logits
        loss_ref = recipe.cp_loss(logits, targets, n_targets)
        loss_ref.backward()
        torch.optim.SGD(ref.parameters(), lr=0.5).step()
        update_ref = torch.cat([p.detach().flatten() for p in ref.parameters()]) - before
        # context parallel on 2 ranks
        if wrapper == "ddp":
            wrapped = DDP(model)
            wrapped.register_comm_hook(None, _sum_hook)
        else:
            wrapped = recipe.shard(model, mesh)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
        cp = build_cp_context(cu, group=cp_group)
        logits = wrapped(ids[:, cp.start:cp.end], cp_context=cp, use_cache=False).logits
        loss = recipe.cp_loss(logits, targets[:, cp.start:cp.end], n_targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in wrapped.parameters()]
        update = torch.cat([p.detach().flatten() for p in params]) - before
        out[(wrapper, variant, memory)] = {"loss": rel_err(total, loss_ref.detach()),
                                           "update": rel_err(update, update_ref)}
    return out


@pytest.fixture(scope="module")
def results():
    return run_group(2, _steps)


@pytest.mark.parametrize("step", STEPS, ids=["-".join(s) for s in STEPS])
def test_training_step_equals_one_process(results, step):
    errs = results[step]
    assert errs["loss"] <= TOL and errs["update"] <= TOL, errs


def _run_recipe(rank, world_size):
    import sys
    recipe = _recipe()
    sys.argv = ["train_cp_fsdp.py", "--steps", "3", "--tokens", "64", "--variant", "mac_mal", "--memory", "mlp"]
    recipe.dist.destroy_process_group = lambda: None  # the helper closes the group
    recipe.dist.init_process_group = lambda *a, **k: None  # already initialised by the helper
    recipe.main()
    return True


def test_recipe_trains():
    assert run_group(2, _run_recipe)
