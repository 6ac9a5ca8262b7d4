"""Every Triton kernel of the library at the block sizes, warps and stages its launcher uses on a GPU
of each compute capability, at the largest tiles and on each precision path: what
``tests/test_kernel_compile.py`` compiles for sm_80 and sm_90 and ``python -m
benchmarks.kernel_resources`` reports (shared memory, registers, spills, per-token SASS counts)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from titans_layers.ops.common.triton_utils import GPU, block_sizes, dot_precision
from titans_layers.ops.mlp_memory.chunk import mlp_launch
from titans_layers.ops.momentum_delta_rule.chunk import (CLIP_BWD_MAX_TILE, chunk_warps, decode_warps, launch_blocks,
                                                         tile_size)
from titans_layers.ops.momentum_delta_rule.fused_recurrent import DECODE_STAGES
from titans_layers.testing.compile import SHARED_MEMORY_LIMIT

LINEAR_CHUNK = "titans_layers.ops.momentum_delta_rule.chunk_kernels"
LINEAR_CHUNK_SPLIT = "titans_layers.ops.momentum_delta_rule.chunk_split_kernels"
LINEAR_FUSED = "titans_layers.ops.momentum_delta_rule.fused_recurrent"
MLP_CHUNK = "titans_layers.ops.mlp_memory.chunk_kernels"
MLP_FUSED = "titans_layers.ops.mlp_memory.fused_recurrent"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INDICES = ("offset", "cu_seqlens", "tile_indptr")
# pointer arguments in the input dtype (the rest are float32 state buffers, or the int64 INDICES)
LINEAR_INPUTS = ("q", "k", "v", "alpha", "eta", "theta", "o", "do", "dv")
MLP_INPUTS = ("q", "k", "v", "alpha", "eta", "theta", "o", "do", "dq", "dk", "dv", "dalpha", "deta", "dtheta")


@dataclass(frozen=True)
class KernelBuild:
    """One kernel compiled as its launcher would launch it: ``kernel`` is "package.module:name";
    the rest are :func:`titans_layers.testing.compile.compile_for_gpu`'s keyword arguments."""

    kernel: str
    label: str
    pointers: dict = field(hash=False)
    scalars: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 1
    capability: int = 90
    # tokens per iteration of the kernel's outer loop, and trips of each loop inside it (None: the
    # kernel has no such structure to count per token; see ``compile.sass_profile``)
    tile_tokens: int | None = None
    inner_trips: int | None = None

    @property
    def name(self) -> str:
        """The kernel's function name."""
        return self.kernel.split(":")[1]

    def compile_kwargs(self) -> dict:
        """Keyword arguments of ``compile_for_gpu`` / ``compile_in_subprocess``, ``capability`` included."""
        return dict(capability=self.capability, pointers=self.pointers, scalars=self.scalars,
                    constexprs=self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    def sass_kwargs(self) -> dict | None:
        """Keyword arguments of ``compile.sass_profile`` for per-token counts, or None (no tiles)."""
        return None if self.tile_tokens is None else dict(tile_tokens=self.tile_tokens, inner_trips=self.inner_trips)


def _pointers(inputs: tuple[str, ...], dtype: str) -> dict[str, str]:
    pointers = {name: f"*{dtype}" for name in inputs}
    pointers.update({name: "*i64" for name in INDICES})
    return pointers


def linear_build(kernel: str, dim: int, chunk_size: int, dtype: str, clip: bool = False,
                 capability: int = 90, BV: int | None = None) -> KernelBuild:
    """A linear-family kernel at K = V = ``dim``, as launched on a GPU with the shared memory for its
    widest V blocks (sm_80, sm_90); ``capability`` the GPU compiled for. ``clip``: the
    update-clipping variant (all of V in one program: one V block, or for the split kernels V in
    sub-blocks of the unclipped width). ``BV``: a narrower V block, one a launch falls back to on a
    GPU with less shared memory (``chunk.forward_candidates``, ``chunk.backward_candidates``)."""
    split = kernel.startswith(LINEAR_CHUNK_SPLIT)
    BK, widest = block_sizes(dim, dim) if split else launch_blocks(dim, dim, clip)[:2]
    BV = BV or widest
    constexprs = dict(H=16, K=dim, V=dim, C=chunk_size, BK=BK, BV=BV, IS_VARLEN=True)
    if split:
        constexprs["NVS"] = -(-dim // BV)
    else:
        constexprs["CLIP"] = clip
    decode = kernel.startswith(LINEAR_FUSED)
    if decode:
        warps = decode_warps(BK, BV)
    else:
        constexprs.update(BT=tile_size(chunk_size), PRECISION=dot_precision(DTYPES[dtype]))
        if "_fwd_" in kernel:
            constexprs["STORE_TILES"] = True
        warps = chunk_warps(constexprs["BT"], BK, dtype == "fp32", split_forward=kernel == LINEAR_SPLIT_FWD)
    stages = DECODE_STAGES if decode else 1
    label = f"K{dim}-C{chunk_size}-{dtype}" + ("-clip" if clip else "") + (f"-BV{BV}" if BV != widest else "")
    return KernelBuild(kernel, label, _pointers(LINEAR_INPUTS, dtype),
                       {"T": "i32", "n_tokens": "i32", "max_norm": "fp32"}, constexprs,
                       num_warps=warps, num_stages=stages, capability=capability)


def mlp_build(kernel: str, dim: int, hidden: int, chunk_size: int, dtype: str, act: int, residual: bool,
              clip: bool, lowp_dots: bool = False, capability: int = 90, bwd_BH: int | None = None) -> KernelBuild:
    """An MLP-memory kernel at K = V = ``dim``, Dh = ``hidden``, activation code ``act``, as launched
    on a GPU of ``capability``; ``lowp_dots``: its ``MLPLaunch.lowp_dots`` variant (chunk kernels);
    ``bwd_BH``: another Dh block for the backward than the launch's."""
    part = "decode" if kernel.startswith(MLP_FUSED) else ("bwd" if kernel.endswith("bwd_kernel") else "fwd")
    launch = mlp_launch(chunk_size, dim, dim, hidden, DTYPES[dtype], GPU(capability, SHARED_MEMORY_LIMIT[capability]),
                        kernels=() if part == "decode" else (part,))
    if bwd_BH is not None:
        launch = replace(launch, bwd_BH=bwd_BH)
    warps, stages, BH = {"fwd": (launch.fwd_warps, 1, launch.fwd_BH), "bwd": (launch.bwd_warps, 1, launch.bwd_BH),
                         "decode": (launch.decode_warps, launch.decode_stages, launch.fwd_BH)}[part]
    constexprs = dict(H=16, K=dim, V=dim, Dh=hidden, C=chunk_size, BK=launch.BK, BV=launch.BV, BH=BH, ACT=act,
                      RESIDUAL=residual, IS_VARLEN=True, CLIP=clip)
    if part != "decode":
        constexprs.update(BT=launch.BT, PRECISION=dot_precision(DTYPES[dtype], lowp_dots))
    if part == "fwd":
        constexprs["STORE_TILES"] = True
    label = f"K{dim}-Dh{hidden}-C{chunk_size}-{dtype}" + ("-clip" if clip else "") + ("-lowp" if lowp_dots else "") \
        + (f"-bwdBH{bwd_BH}" if bwd_BH is not None else "")
    per_token = {} if part == "decode" else dict(tile_tokens=launch.BT, inner_trips=-(-hidden // BH))
    return KernelBuild(kernel, label, _pointers(MLP_INPUTS, dtype), {"T": "i32", "max_norm": "fp32"}, constexprs,
                       num_warps=warps, num_stages=stages, capability=capability, **per_token)


LINEAR_KERNELS = [f"{LINEAR_CHUNK}:chunk_momentum_delta_rule_fwd_kernel",
                  f"{LINEAR_CHUNK}:chunk_momentum_delta_rule_bwd_kernel",
                  f"{LINEAR_FUSED}:fused_recurrent_momentum_delta_rule_fwd_kernel"]
LINEAR_SPLIT = f"{LINEAR_CHUNK_SPLIT}:chunk_momentum_delta_rule_bwd_split_kernel"
LINEAR_SPLIT_FWD = f"{LINEAR_CHUNK_SPLIT}:chunk_momentum_delta_rule_fwd_split_kernel"
# (K = V, chunk size, input dtype): the largest tiles, and each precision path (float32 in 16- and
# in 32-token tiles, which take 16 warps)
LINEAR_CONFIGS = [(64, 64, "bf16"), (128, 64, "bf16"), (128, 16, "fp32"), (64, 64, "fp32")]
# Update clipping holds all of V in one program, at the largest tiles each kernel gets: the forward
# and the decode kernel one [128, 128] block; the backward one block up to CLIP_BWD_MAX_TILE
# (64 x 64; fp32 needs the most shared memory), the split backward beyond (V in sub-blocks); the
# split forward (V in sub-blocks, what GPUs with 99 KB a block launch above K = V = 64).
LINEAR_CLIP_CASES = [(LINEAR_KERNELS[0], (128, 64, "bf16")), (LINEAR_KERNELS[2], (128, 64, "bf16")),
                     (LINEAR_KERNELS[1], (64, 64, "fp32")), (LINEAR_SPLIT, (128, 64, "fp32")),
                     (LINEAR_SPLIT_FWD, (128, 64, "fp32"))]
assert LINEAR_CLIP_CASES[2][1][0] ** 2 <= CLIP_BWD_MAX_TILE  # the single-block backward's tile

MLP_KERNELS = [f"{MLP_CHUNK}:chunk_mlp_memory_fwd_kernel", f"{MLP_CHUNK}:chunk_mlp_memory_bwd_kernel",
               f"{MLP_FUSED}:fused_recurrent_mlp_memory_fwd_kernel"]
# (K = V, Dh, chunk size, input dtype, activation code, residual, update clipping): the largest tiles,
# each precision path, both activations, with and without clipping (its extra pass and adjoints are
# compiled at the largest tiles, where shared memory is tightest)
MLP_CONFIGS = [(64, 256, 64, "bf16", 0, False, False), (128, 256, 64, "bf16", 1, True, True),
               (128, 256, 64, "fp32", 0, True, True), (64, 256, 64, "fp32", 1, False, False)]


# The chunk kernels with bfloat16 dot operands (MLPLaunch.lowp_dots; the interpreter runs their
# float32 emulation, so only this compile sees the bf16 code): at the benchmark's shape, and at the
# largest tiles with clipping.
MLP_LOWP_CONFIGS = [MLP_CONFIGS[0], MLP_CONFIGS[1]]


CAPABILITIES = (80, 90)


def kernel_builds(capability: int) -> list[KernelBuild]:
    """Every kernel build the compile check covers for a GPU of ``capability`` (30 for sm_80; 31 for
    sm_90, whose wider backward Dh blocks are set beside the backward at the sm_80 block, BH = 16)."""
    builds = [linear_build(kernel, *config, capability=capability) for kernel in LINEAR_KERNELS
              for config in LINEAR_CONFIGS]
    builds += [linear_build(kernel, *config, clip=True, capability=capability) for kernel, config in LINEAR_CLIP_CASES]
    builds += [mlp_build(kernel, *config, capability=capability) for kernel in MLP_KERNELS for config in MLP_CONFIGS]
    builds += [mlp_build(kernel, *config, lowp_dots=True, capability=capability) for kernel in MLP_KERNELS[:2]
               for config in MLP_LOWP_CONFIGS]
    if capability >= 90:
        builds.append(mlp_build(MLP_KERNELS[1], *MLP_CONFIGS[0], capability=capability, bwd_BH=16))
    return builds


# The linear chunk kernels' launches on a GPU with 99 KB a block where the widest V blocks do not
# fit: the first of ``chunk.forward_candidates`` / ``chunk.backward_candidates`` that does, at
# 32-token tiles (16-token tiles need less). (kernel, (K = V, chunk size, dtype), clip, BV) with the
# widest launch's and this one's sm_89 needs:
LINEAR_SMALL_SHARED = [
    (LINEAR_SPLIT_FWD, (128, 32, "bf16"), True, 32),  # one [128, 128] block 128 KB, split 48 KB
    (LINEAR_SPLIT_FWD, (128, 32, "fp32"), True, 32),  # 112 -> 84 KB
    (LINEAR_KERNELS[1], (64, 32, "fp32"), False, 32),  # 132 -> 84 KB
    (LINEAR_KERNELS[1], (128, 32, "fp32"), False, 16),  # 140 -> 96 KB
    (LINEAR_SPLIT, (64, 32, "fp32"), True, 32),  # one block 132 KB, split at 64 columns 120 -> 76 KB
    (LINEAR_SPLIT, (128, 32, "bf16"), True, 16),  # 112 -> 64 KB
    (LINEAR_SPLIT, (128, 32, "fp32"), True, 16),  # -> 90 KB
]


def small_shared_builds() -> list[KernelBuild]:
    """Compiled for sm_89, what a GPU with 99 KB of shared memory a block (sm_86, sm_89, sm_120)
    launches where it differs from sm_80: the MLP chunk kernels' 16-token tiles
    (``chunk.TILE_SHARED``: 16-bit inputs at K = V = 128 with clipping, the most shared memory, and
    float32 inputs at K = V = 64) and the forward's 16-column Dh blocks for float32 inputs at
    K = V = 128 (``chunk.FP32_WIDE_SHARED``, without gradients), and the linear chunk kernels'
    narrower V blocks and split kernels (``LINEAR_SMALL_SHARED``)."""
    builds = [mlp_build(kernel, *config, capability=89) for kernel in MLP_KERNELS[:2]
              for config in (MLP_CONFIGS[1], MLP_CONFIGS[3])]
    builds.append(mlp_build(MLP_KERNELS[0], *MLP_CONFIGS[2], capability=89))
    return builds + [linear_build(kernel, *config, clip=clip, capability=89, BV=BV)
                     for kernel, config, clip, BV in LINEAR_SMALL_SHARED]
