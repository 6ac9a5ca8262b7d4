"""Context parallelism of the layers and models: every block kind under ``cp_context=`` against one
process on the whole packed batch (2 and 3 gloo ranks, float32, relative error <= 1e-5).

Slice edges fall inside sequences, inside memory chunks (4) and MAC segments (5), and (with 3 ranks
over 9 tokens) slices are shorter than the attention window and the convolution, so the halo and
the MAC state cross more than one rank. Gradients of the replicated parameters are summed over the
ranks; the inputs' gradients are gathered.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed_helpers import raised_message, rel_err, run_group

TOL = 1e-5  # outputs, input gradients, the whole parameter gradient
PARAM_TOL = 1e-4  # any single parameter's gradient (SPEC §1's float32 gradient tolerance)
LAYOUTS = {2: [[0, 3, 17, 24], [0, 10, 24]], 3: [[0, 5, 30, 36], [0, 9]]}
MODEL_LAYOUTS = {2: [[0, 3, 17, 24]], 3: [[0, 9]]}  # the models: slice edges mid-segment; slices shorter than a window
D = 16


def _gathered_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    pieces = [torch.empty_like(x.grad) for _ in range(world_size)]
    dist.all_gather(pieces, x.grad.contiguous())
    return torch.cat(pieces, dim=1)


def _compare_module(make, cu, call_whole, call_cp, seed, world_size) -> dict:
    """Outputs, input gradients and summed parameter gradients of a module, CP against whole."""
    from titans_layers.distributed import build_cp_context
    torch.manual_seed(seed)
    module = make()
    T = cu[-1]
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(1, T, module_width(module), generator=g)
    w = None
    xr = x.clone().requires_grad_()
    y_ref = call_whole(module, xr, torch.tensor(cu))
    w = torch.randn(y_ref.shape, generator=g)
    (y_ref * w).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    cp = build_cp_context(torch.tensor(cu))
    xl = x[:, cp.start:cp.end].clone().requires_grad_()
    y = call_cp(module, xl, cp)
    (y * w[:, cp.start:cp.end]).sum().backward()
    errs = {"out": rel_err(y.detach(), y_ref.detach()[:, cp.start:cp.end]),
            "dx": rel_err(_gathered_grad(xl, world_size), xr.grad)}
    errs.update(_param_grad_errors(module, ref_grads))
    return errs


def _param_grad_errors(module, ref_grads: dict) -> dict:
    """Parameter gradients summed over the ranks against one process: the relative error of the
    whole gradient (all parameters as one vector) and the largest of any single parameter."""
    mine, theirs, worst = [], [], 0.0
    for n, p in module.named_parameters():
        if n not in ref_grads:
            continue
        gsum = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(gsum)
        worst = max(worst, rel_err(gsum, ref_grads[n]))
        mine.append(gsum.flatten())
        theirs.append(ref_grads[n].flatten())
    return {"dparams": rel_err(torch.cat(mine), torch.cat(theirs)), "dparam_max": worst}


def module_width(module) -> int:
    return getattr(module, "hidden_size", None) or module.channels


def _layer_checks(world_size) -> dict:
    from titans_layers.modules import NeuralMemory, ShortConvolution, SlidingWindowAttention
    res = {}
    for li, cu in enumerate(LAYOUTS[world_size]):
        res[("conv", li)] = _compare_module(
            lambda: ShortConvolution(D, 4), cu, lambda m, x, c: m(x, cu_seqlens=c)[0],
            lambda m, x, cp: m(x, cp_context=cp)[0], 10 + li, world_size)
        prefix = torch.randn(1, 2, D)
        for name, kw in (("swa", {}), ("swa_prefix", {"prefix_states": prefix})):
            res[(name, li)] = _compare_module(
                lambda: SlidingWindowAttention(D, 2, window_size=6), cu,
                lambda m, x, c, kw=kw: m(x, cu_seqlens=c, **kw)[0],
                lambda m, x, cp, kw=kw: m(x, cp_context=cp, **kw)[0], 20 + li, world_size)
        for name, kw, mode in (("memory_linear", dict(memory="linear"), "auto"),
                               ("memory_linear_heads", dict(memory="linear"), "heads"),
                               ("memory_mlp", dict(memory="mlp"), "auto"),
                               ("memory_mlp_clip", dict(memory="mlp", max_update_norm=0.05), "auto")):
            if mode == "heads" and 2 % world_size:
                continue
            res[(name, li)] = _compare_module(
                lambda kw=kw: NeuralMemory(D, 2, chunk_size=4, **kw), cu,
                lambda m, x, c: m(x, cu_seqlens=c)[0],
                lambda m, x, cp, mode=mode: m(x, cp_context=cp, cp_mode=mode)[0], 30 + li, world_size)
    return res


MODELS = {  # name -> config overrides (tests/model_helpers.TINY: segment 5, chunk 4, window 6)
    "mac": dict(variant="mac"),
    "mac_learned_mlp": dict(variant="mac", memory="mlp", num_retrieval_queries=3),
    "mag": dict(variant="mag"),
    "mal_mlp": dict(variant="mal", memory="mlp"),
    "lmm": dict(variant="lmm"),
    "hybrid": dict(variant="mac", block_types=["swa", "mal"]),
}


def _model_checks(world_size) -> dict:
    from tests.model_helpers import tiny_config
    from titans_layers.distributed import build_cp_context
    from titans_layers.models import TitansForCausalLM
    res = {}
    for li, cu in enumerate(MODEL_LAYOUTS[world_size]):
        T = cu[-1]
        ids = torch.randint(1, 100, (1, T), generator=torch.Generator().manual_seed(li))
        for name, over in MODELS.items():
            torch.manual_seed(0)
            over = dict(over)
            model = TitansForCausalLM(tiny_config(over.pop("variant"), over.pop("memory", "linear"), **over)).train()
            logits_ref = model(ids, cu_seqlens=torch.tensor(cu), use_cache=False).logits
            w = torch.randn(logits_ref.shape, generator=torch.Generator().manual_seed(5))
            (logits_ref * w).sum().backward()
            ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            cp = build_cp_context(torch.tensor(cu))
            out = model(ids[:, cp.start:cp.end], cp_context=cp, use_cache=False).logits
            (out * w[:, cp.start:cp.end]).sum().backward()
            res[(name, li)] = {"logits": rel_err(out.detach(), logits_ref.detach()[:, cp.start:cp.end]),
                               **_param_grad_errors(model, ref)}
            with torch.no_grad():  # inference: the chains and halos run without their backward halves
                out = model.eval()(ids[:, cp.start:cp.end], cp_context=cp).logits
            res[(name, li)]["logits_no_grad"] = rel_err(out, logits_ref.detach()[:, cp.start:cp.end])
    return res


def _bad_calls(world_size) -> dict:
    """Calls a context-parallel layer or model cannot take raise clear errors; returns the messages."""
    from tests.model_helpers import tiny_config
    from titans_layers.distributed import build_cp_context
    from titans_layers.models import TitansForCausalLM
    from titans_layers.modules import NeuralMemory, ShortConvolution, SlidingWindowAttention
    cp = build_cp_context(torch.tensor([0, 5, 6 * world_size]))
    x = torch.randn(1, 6, D)
    memory, attention, conv = NeuralMemory(D, 2, chunk_size=4), SlidingWindowAttention(D, 2, 6), ShortConvolution(D)
    msgs = {}

    def expect(name, fn, exc=ValueError):
        msgs[name] = raised_message(name, fn, exc)

    expect("mask", lambda: memory(x, attention_mask=torch.ones(1, 6), cp_context=cp))
    expect("cu_seqlens", lambda: attention(x, cu_seqlens=torch.tensor([0, 6]), cp_context=cp))
    expect("cache", lambda: memory(x, use_cache=True, cp_context=cp))
    expect("slice", lambda: attention(torch.randn(1, 5, D), cp_context=cp))
    expect("batch", lambda: memory(torch.randn(2, 6, D), cp_context=cp))
    expect("conv_cache", lambda: conv(x, cache=torch.zeros(2, 3, D), cp_context=cp))
    expect("not_context", lambda: memory(x, cp_context=(0, 6)), TypeError)
    model = TitansForCausalLM(tiny_config("mag"))
    ids = torch.randint(1, 100, (1, 6))
    expect("labels", lambda: model(ids, labels=ids, cp_context=cp))
    fla_model = TitansForCausalLM(tiny_config("mag", block_types=["mag", "gated_deltanet"]))
    expect("fla_block", lambda: fla_model(ids, cp_context=cp, use_cache=False))
    # eval mode defaults to use_cache=True, which a cp_context turns off (no error)
    model.eval()(ids, cp_context=cp)
    return msgs


def _all_checks(rank, world_size):
    torch.manual_seed(0)
    out = {"bad": _bad_calls(world_size)}
    for part in (_layer_checks(world_size), _model_checks(world_size)):
        for key, errs in part.items():
            gathered = [None] * world_size
            dist.all_gather_object(gathered, errs)
            out[key] = {k: max(d[k] for d in gathered) for k in errs}
    return out


@pytest.fixture(scope="module", params=[2, 3])
def results(request):
    return request.param, run_group(request.param, _all_checks)


def _bad(errs: dict, key) -> list:
    return [f"{key} {k}: {v:.2e}" for k, v in errs.items() if not v <= (PARAM_TOL if k == "dparam_max" else TOL)]


def _failures(res, prefix):
    return [msg for key, errs in res.items() if key != "bad" and key[0].startswith(prefix)
            for msg in _bad(errs, key)]


@pytest.mark.parametrize("kind", ["conv", "swa", "memory"])
def test_layers_equal_one_process(results, kind):
    world_size, res = results
    assert any(key != "bad" and key[0].startswith(kind) for key in res)
    assert not _failures(res, kind), "\n".join(_failures(res, kind))


@pytest.mark.parametrize("model", list(MODELS))
def test_models_equal_one_process(results, model):
    world_size, res = results
    keys = [key for key in res if key != "bad" and key[0] == model]
    assert keys
    bad = [msg for key in keys for msg in _bad(res[key], key)]
    assert not bad, "\n".join(bad)


def test_bad_calls_raise_clear_errors(results):
    world_size, res = results
    msgs = res["bad"]
    for name in ("mask", "cu_seqlens"):
        assert "neither `attention_mask` nor `cu_seqlens`" in msgs[name]
    assert "without a cache" in msgs["cache"]
    assert "this rank's slice of" in msgs["slice"]
    assert "B = 1" in msgs["batch"]
    assert "neither `cache` nor `cu_seqlens`" in msgs["conv_cache"]
    assert "CPContext" in msgs["not_context"]
    assert "targets shifted over the whole batch" in msgs["labels"]
    assert "does not take `cp_context`" in msgs["fla_block"]
