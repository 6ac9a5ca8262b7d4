"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 at the block sizes, warps and stages
the launchers use on each (``titans_layers/testing/kernel_builds.py``), and fits the GPU's shared
memory: a kernel that only the interpreter accepts fails here. The MLP chunk kernels whose tiles
shrink on GPUs with 99 KB of shared memory are compiled for sm_89 as well."""

import pytest

from titans_layers.testing.compile import compile_in_subprocess
from titans_layers.testing.kernel_builds import CAPABILITIES, kernel_builds, small_shared_builds

BUILDS = [build for capability in CAPABILITIES for build in kernel_builds(capability)] + small_shared_builds()


@pytest.mark.parametrize("build", BUILDS, ids=[f"sm{b.capability}-{b.name}-{b.label}" for b in BUILDS])
def test_kernel_compiles_for_gpu(build):
    usage = compile_in_subprocess(build.kernel, **build.compile_kwargs())
    assert 0 < usage["registers"] <= 255 and usage["shared"] >= 0
    if build.capability >= 90 and "momentum_delta_rule" in build.name:
        # no linear kernel in ptxas's 32-register fallback (chunk.chunk_warps, chunk.decode_warps; on
        # sm_80 its bf16 backward falls back at any warps)
        assert usage["registers"] > 32, usage
    # mlp_launch's tables of what the MLP chunk kernels need: the sm_90 backward's wide Dh blocks, and
    # the tiles before sm_90
    from titans_layers.ops.mlp_memory.chunk import FP32_WIDE_SHARED, TILE_SHARED, WIDE_BWD_BLOCKS
    c = build.constexprs
    if build.name == "chunk_mlp_memory_bwd_kernel" and c["BH"] > 16:
        need = next(shared for dim, BH, shared in WIDE_BWD_BLOCKS if max(c["K"], c["V"]) <= dim and BH == c["BH"])
        assert usage["shared"] <= need, (usage["shared"], need)
    if build.name.startswith("chunk_mlp_memory") and build.capability < 90:
        need = TILE_SHARED[(build.pointers["q"] == "*fp32", max(c["K"], c["V"]) > 64)][c["BT"]]
        if build.pointers["q"] == "*fp32" and max(c["K"], c["V"]) > 64:  # each kernel's own need
            if build.name.endswith("bwd_kernel"):
                need = FP32_WIDE_SHARED["bwd"]
            elif c["BH"] == 16:  # the forward in the narrow Dh blocks it takes without gradients
                need = FP32_WIDE_SHARED["fwd"]
        assert usage["shared"] <= need, (usage["shared"], need)


def test_builds_cover_every_kernel():
    """Every ``@triton.jit`` kernel of the ops (a launched function, named ``*_kernel``; the other
    jitted functions are helpers inlined into them) is compiled by some build."""
    import importlib
    import pkgutil

    import titans_layers.ops as ops

    from triton.runtime.jit import KernelInterface

    kernels = set()
    for info in pkgutil.walk_packages(ops.__path__, "titans_layers.ops."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            # a jitted function (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1) defined here
            fn = getattr(obj, "fn", None)
            if isinstance(obj, KernelInterface) and getattr(fn, "__module__", None) == info.name:
                if name.endswith("_kernel"):
                    kernels.add(f"{info.name}:{name}")
    assert len(kernels) == 8 and all(kernels == {b.kernel for b in kernel_builds(c)} for c in CAPABILITIES)


def test_sass_profile_recovers_the_state_traffic_of_the_mlp_backward():
    """``sass_profile`` finds the backward's tile loop and its three Dh loops, and its per-token
    global traffic is what the kernel must move: per tile and Dh block, 2 anchor blocks (pass A),
    10 state and adjoint blocks (pass B), 8 loads and 6 stores (pass C) of ``[BK, BH]`` float32,
    and the five ``[BT, BH]`` float32 blocks pass B hands pass C (stored, then loaded), plus each
    token's own inputs and gradients (a few bytes per thread)."""
    from titans_layers.testing.kernel_builds import MLP_KERNELS, mlp_build

    build = mlp_build(MLP_KERNELS[1], 64, 256, 64, "bf16", 0, False, False, capability=90)
    usage = compile_in_subprocess(build.kernel, sass=build.sass_kwargs(), **build.compile_kwargs())
    loops, per_token = usage["sass"]["loops"], usage["sass"]["per_token"]
    assert len(loops) == 4 and all(loop["mma"] > 0 for loop in loops)
    c = build.constexprs
    threads = 32 * build.num_warps
    block_bytes = 4 * c["BH"] * (26 * c["BK"] + 10 * c["BT"])  # per tile and Dh block
    state = block_bytes * build.inner_trips / threads / build.tile_tokens  # bytes per thread and token
    assert state <= per_token["global_bytes"] <= state + 16, (state, per_token)
    assert per_token["mma"] > 0 and per_token["instructions"] > per_token["mma"]


def test_small_shared_builds_are_launch_candidates():
    """The linear chunk kernels' sm_89 builds are launches their launchers would try
    (``forward_candidates``, ``backward_candidates``)."""
    from titans_layers.ops.momentum_delta_rule.chunk import backward_candidates, forward_candidates
    from titans_layers.testing.kernel_builds import LINEAR_SMALL_SHARED

    for kernel, (dim, _, _), clip, BV in LINEAR_SMALL_SHARED:
        candidates = forward_candidates if "_fwd_" in kernel else backward_candidates
        assert (kernel.endswith("split_kernel"), BV) in [config for _, config in candidates(dim, dim, clip)]
