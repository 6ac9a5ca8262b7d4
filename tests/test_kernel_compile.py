"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 at the block sizes the launchers use,
and fits the GPU's shared memory: a kernel that only the interpreter accepts fails here."""

import pytest
import torch

from titans_layers.ops.common.triton_utils import block_sizes
from titans_layers.ops.mlp_memory.chunk import block_sizes as mlp_block_sizes
from titans_layers.ops.mlp_memory.chunk import tile_size as mlp_tile_size
from titans_layers.ops.momentum_delta_rule.chunk import CLIP_BWD_MAX_TILE, launch_blocks, launch_warps, tile_size
from titans_layers.testing.compile import compile_in_subprocess

CHUNK = "titans_layers.ops.momentum_delta_rule.chunk_kernels"
FUSED = "titans_layers.ops.momentum_delta_rule.fused_recurrent"
KERNELS = [f"{CHUNK}:chunk_momentum_delta_rule_fwd_kernel", f"{CHUNK}:chunk_momentum_delta_rule_bwd_kernel",
           f"{FUSED}:fused_recurrent_momentum_delta_rule_fwd_kernel"]

# (head dim K = V, chunk size, input dtype): the largest tiles, and each precision path
CONFIGS = [(64, 64, "bf16"), (128, 64, "bf16"), (128, 16, "fp32")]
INPUTS = ("q", "k", "v", "alpha", "eta", "theta", "o", "do", "dv")
INDICES = ("offset", "cu_seqlens", "tile_indptr")


def _args(kernel, dim, chunk_size, dtype, clip=False):
    """Arguments as the launchers pass them; ``clip``: the update-clipping variant (all of V in one
    program: one V block, or for the split backward V in sub-blocks of the unclipped width)."""
    BK, BV = launch_blocks(dim, dim, clip)[:2] if kernel != SPLIT else block_sizes(dim, dim)
    pointers = {name: f"*{dtype}" for name in INPUTS}
    pointers.update({name: "*i64" for name in INDICES})
    constexprs = dict(H=16, K=dim, V=dim, C=chunk_size, BK=BK, BV=BV, IS_VARLEN=True)
    if kernel == SPLIT:
        constexprs["NVS"] = -(-dim // BV)
    else:
        constexprs["CLIP"] = clip
    if kernel.startswith(CHUNK):
        constexprs.update(BT=tile_size(chunk_size), PRECISION="ieee" if dtype == "fp32" else "tf32")
    if kernel.endswith("fwd_kernel") and kernel.startswith(CHUNK):
        constexprs["STORE_TILES"] = True
    return dict(pointers=pointers, scalars={"T": "i32", "n_tokens": "i32", "max_norm": "fp32"},
                constexprs=constexprs, num_warps=launch_warps(BK, BV))


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"K{c[0]}-C{c[1]}-{c[2]}")
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.split(":")[1])
def test_kernel_compiles_for_gpu(kernel, config, capability):
    compile_in_subprocess(kernel, capability=capability, **_args(kernel, *config))


# Update clipping holds all of V in one program, at the largest tiles each kernel gets: the forward
# and the decode kernel one [128, 128] block; the backward one block up to CLIP_BWD_MAX_TILE
# (64 x 64; fp32 needs the most shared memory), the split backward beyond (V in sub-blocks).
SPLIT = f"{CHUNK}:chunk_momentum_delta_rule_bwd_split_kernel"
CLIP_CASES = [(KERNELS[0], (128, 64, "bf16")), (KERNELS[2], (128, 64, "bf16")), (KERNELS[1], (64, 64, "fp32")),
              (SPLIT, (128, 64, "fp32"))]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("kernel, config", CLIP_CASES,
                         ids=[f"{k.split(':')[1]}-K{c[0]}-{c[2]}" for k, c in CLIP_CASES])
def test_clipping_kernel_compiles_for_gpu(kernel, config, capability):
    assert kernel != KERNELS[1] or config[0] ** 2 <= CLIP_BWD_MAX_TILE  # the single-block backward's tile
    compile_in_subprocess(kernel, capability=capability, **_args(kernel, *config, clip=True))


MLP_CHUNK = "titans_layers.ops.mlp_memory.chunk_kernels"
MLP_FUSED = "titans_layers.ops.mlp_memory.fused_recurrent"
MLP_KERNELS = [f"{MLP_CHUNK}:chunk_mlp_memory_fwd_kernel", f"{MLP_CHUNK}:chunk_mlp_memory_bwd_kernel",
               f"{MLP_FUSED}:fused_recurrent_mlp_memory_fwd_kernel"]
# (K = V, Dh, chunk size, input dtype, activation code, residual, update clipping): the largest tiles,
# each precision path, both activations, with and without clipping (its extra pass and adjoints are
# compiled at the largest tiles, where shared memory is tightest)
MLP_CONFIGS = [(64, 256, 64, "bf16", 0, False, False), (128, 256, 64, "bf16", 1, True, True),
               (128, 256, 64, "fp32", 0, True, True), (64, 256, 64, "fp32", 1, False, False)]
MLP_INPUTS = ("q", "k", "v", "alpha", "eta", "theta", "o", "do", "dq", "dk", "dv", "dalpha", "deta", "dtheta")


def _mlp_args(kernel, dim, hidden, chunk_size, dtype, act, residual, clip):
    BK, BV, BH_fwd, BH_bwd = mlp_block_sizes(dim, dim, hidden)
    pointers = {name: f"*{dtype}" for name in MLP_INPUTS}
    pointers.update({name: "*i64" for name in INDICES})
    constexprs = dict(H=16, K=dim, V=dim, Dh=hidden, C=chunk_size, BK=BK, BV=BV,
                      BH=BH_bwd if kernel.endswith("bwd_kernel") else BH_fwd, ACT=act, RESIDUAL=residual,
                      IS_VARLEN=True, CLIP=clip)
    if kernel.startswith(MLP_CHUNK):
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        constexprs.update(BT=mlp_tile_size(chunk_size, dim, dim, torch_dtype),
                          PRECISION="ieee" if dtype == "fp32" else "tf32")
    if kernel.endswith("chunk_mlp_memory_fwd_kernel"):
        constexprs["STORE_TILES"] = True
    return dict(pointers=pointers, scalars={"T": "i32", "max_norm": "fp32"}, constexprs=constexprs)


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("config", MLP_CONFIGS,
                         ids=lambda c: f"K{c[0]}-Dh{c[1]}-C{c[2]}-{c[3]}" + ("-clip" if c[6] else ""))
@pytest.mark.parametrize("kernel", MLP_KERNELS, ids=lambda k: k.split(":")[1])
def test_mlp_kernel_compiles_for_gpu(kernel, config, capability):
    compile_in_subprocess(kernel, capability=capability, **_mlp_args(kernel, *config))
