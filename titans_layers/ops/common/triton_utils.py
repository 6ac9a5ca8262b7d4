"""Small helpers for launching Triton kernels (on CUDA, or on CPU under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Callable, NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

# Head dims the kernels keep on chip in one tile (K rows, a block of V columns).
MAX_HEAD_DIM = 128


def is_interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class GPU(NamedTuple):
    """What a launch needs to know of the GPU: its compute capability as one number (80 for sm_80,
    90 for sm_90) and the shared memory one block may use, in bytes."""

    capability: int
    shared_memory: int


def gpu_of(x: torch.Tensor) -> GPU | None:
    """The :class:`GPU` that holds ``x``, or None off CUDA and under the interpreter (where launch
    settings only need to be valid)."""
    if x.device.type != "cuda" or is_interpreting():
        return None
    return _gpu(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _gpu(index: int) -> GPU:
    major, minor = torch.cuda.get_device_capability(index)
    return GPU(10 * major + minor, triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def check_triton_device(op_name: str, x: torch.Tensor) -> None:
    """Raise unless the Triton kernels can run on ``x``'s device."""
    if x.device.type == "cuda" or (x.device.type == "cpu" and is_interpreting()):
        return
    raise RuntimeError(f"`{op_name}` runs Triton kernels and needs CUDA tensors (or CPU tensors with "
                       f"TRITON_INTERPRET=1 set before triton is imported); got a tensor on {x.device}. "
                       f"The `naive_chunk_*` ops run anywhere.")


@contextmanager
def explained_launch(kernel: str, q: torch.Tensor, K: int, V: int, chunk_size: int | None = None):
    """Around a kernel launch: Triton's ``OutOfResources`` (the compiled kernel needs more shared
    memory a block than this GPU has) becomes a ValueError that names the kernel, the problem
    (head dims, input dtype, chunk size) and what needs less."""
    try:
        yield
    except OutOfResources as e:
        gpu = gpu_of(q)
        raise shared_memory_error(kernel, K, V, q.dtype, chunk_size, e.required, e.limit,
                                  gpu.capability if gpu else None, e.name) from e


# (launch key, device) -> index of the first candidate launch that fitted there (launch_first_fitting)
_FIRST_FIT: dict = {}


def launch_first_fitting(key: tuple, candidates: Sequence[tuple[str, object]], launch: Callable, q: torch.Tensor,
                         K: int, V: int, chunk_size: int | None = None):
    """``launch(config)`` for the first ``(kernel, config)`` of ``candidates`` (widest tiles first)
    whose kernel fits the GPU: a launch that raises Triton's ``OutOfResources`` (more shared memory a
    block than the GPU has; raised before the kernel runs, so nothing was written) moves on to the
    next candidate. The first that fits is remembered for ``key`` on q's device, so later calls go
    straight to it. When none fits, the last one's failure is explained as in
    :func:`explained_launch`. Returns what ``launch`` returns."""
    if not candidates:
        raise ValueError("launch_first_fitting needs at least one candidate launch")
    memo = (key, q.device)
    for i in range(min(_FIRST_FIT.get(memo, 0), len(candidates) - 1), len(candidates)):
        kernel, config = candidates[i]
        if i + 1 < len(candidates):
            try:
                result = launch(config)
            except OutOfResources:
                continue
        else:
            with explained_launch(kernel, q, K, V, chunk_size):
                result = launch(config)
        _FIRST_FIT[memo] = i
        return result


def shared_memory_error(what: str, K: int, V: int, dtype: torch.dtype, chunk_size: int | None, need: int,
                        limit: int, capability: int | None = None, resource: str = "shared memory",
                        hint: str = "") -> ValueError:
    """The error for ``what`` (a kernel) needing ``need`` bytes of ``resource`` a block at head dims
    K, V, input ``dtype`` and ``chunk_size`` where the GPU (sm_``capability``) has ``limit``;
    ``hint``: what else would fit, if anything."""
    problem = f"K = {K}, V = {V} with {dtype} inputs" + (f", chunk size {chunk_size}" if chunk_size else "")
    on = f" (sm_{capability})" if capability else ""
    amounts = (f"{need >> 10} KB of shared memory a block; this GPU{on} has {limit >> 10} KB"
               if resource == "shared memory" else f"{need} of {resource}; this GPU{on} has {limit}")
    hint = f" ({hint})" if hint else ""
    return ValueError(f"{what} at {problem} needs {amounts}{hint}. Smaller head dims, bfloat16 / float16 inputs or "
                      f"no update clipping need less; the naive_chunk_* ops run anywhere")


def check_head_dims(K: int, V: int) -> None:
    """Raise unless the head dims fit the kernels' tiles."""
    for name, d in (("K", K), ("V", V)):
        if d > MAX_HEAD_DIM:
            raise ValueError(f"head dim {name} = {d} is larger than the Triton kernels support ({MAX_HEAD_DIM}); "
                             f"use the naive_chunk_* op or split heads")


def block_sizes(K: int, V: int) -> tuple[int, int]:
    """Tile sizes (BK, BV): all of K in one tile, V split so that a state tile stays <= 64 x 64 x 2."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 64 if BK <= 64 else 32)
    return BK, BV


def narrower_blocks(BV: int) -> list[int]:
    """``BV`` and each half of it down to 16: the V blocks to try, widest first, where V blocks are
    independent programs (a narrower block needs less shared memory and launches more programs)."""
    return [BV >> i for i in range(max(1, BV.bit_length() - 4))]


def dot_precision(dtype: torch.dtype, low_precision_operands: bool = False) -> str:
    """The ``PRECISION`` of :func:`mm` on a GPU for inputs of ``dtype``: full fp32 ("ieee") for
    float32 inputs; for bfloat16 / float16 inputs tf32 on float32 operands ("tf32"), or with
    ``low_precision_operands`` operands rounded to the input dtype ("bf16" / "fp16", as fla's
    kernels do: twice the tensor-core rate and half the operand registers; accumulation stays
    float32). Launchers pass it through :func:`runnable_precision`."""
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    if not low_precision_operands:
        return "tf32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# What Triton's interpreter does not model, emulated by mm (exact in float32): it computes "tf32"
# dots in full fp32, where the GPU's tf32 MMA ignores the 13 low mantissa bits of the float32
# operands Triton passes it (no cvt.rna.tf32 in the PTX: truncation), and it computes bfloat16 on
# raw bits, where the GPU rounds float32 to bfloat16 to nearest even (cvt.rn.bf16.f32).
INTERPRETER_PRECISION = {"tf32": "emulate_tf32", "bf16": "emulate_bf16"}


def runnable_precision(precision: str) -> str:
    """``precision`` (:func:`dot_precision`) as the kernels take it here: on a GPU unchanged; under
    ``TRITON_INTERPRET=1`` "tf32" and "bf16" become their float32 emulations (``INTERPRETER_PRECISION``),
    so the CPU tests see the GPU's operand rounding."""
    return INTERPRETER_PRECISION.get(precision, precision) if is_interpreting() else precision


@triton.jit
def truncate_mantissa(x, BITS: tl.constexpr):
    """float32 ``x`` with its ``BITS`` low mantissa bits cleared (round toward zero)."""
    u = x.to(tl.uint32, bitcast=True)
    return (u & (0xFFFFFFFF ^ ((1 << BITS) - 1))).to(tl.float32, bitcast=True)


@triton.jit
def round_mantissa(x, BITS: tl.constexpr):
    """float32 ``x`` rounded to nearest even at its ``BITS``-th mantissa bit (finite ``x``)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u + ((1 << (BITS - 1)) - 1) + ((u >> BITS) & 1)
    return (u & (0xFFFFFFFF ^ ((1 << BITS) - 1))).to(tl.float32, bitcast=True)


@triton.jit
def mm(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32 (:func:`dot_precision`): PRECISION "ieee" or "tf32" takes
    float32 operands; "bf16" or "fp16" rounds both operands to that dtype first; "emulate_tf32"
    and "emulate_bf16" are the interpreter's exact float32 stand-ins for "tf32" and "bf16"
    (:func:`runnable_precision`)."""
    if PRECISION == "bf16":
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PRECISION == "fp16":
        c = tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif PRECISION == "emulate_tf32":
        c = tl.dot(truncate_mantissa(a, 13), truncate_mantissa(b, 13), input_precision="ieee")
    elif PRECISION == "emulate_bf16":
        c = tl.dot(round_mantissa(a, 16), round_mantissa(b, 16), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def segment_products(g, r):
    """[C] gate -> [C, C] with D[t, j] = prod_{l=j+1..t} g_l for t >= j, else 0 (no division)."""
    X = tl.where(r[:, None] > r[None, :], g[:, None], 1.0)
    D = tl.cumprod(X, axis=0)
    return tl.where(r[:, None] >= r[None, :], D, 0.0)


@triton.jit
def take_row(X, r, i):
    """Row i of a [C, C] tile, as a [C] vector."""
    return tl.sum(tl.where(r[:, None] == i, X, 0.0), axis=0)


@triton.jit
def take(x, r, i):
    """Element i of a [C] vector, as a scalar."""
    return tl.sum(tl.where(r == i, x, 0.0), axis=0)


@triton.jit
def subdiagonal(X, r):
    """[C] vector with entry l = X[l, l - 1] (0 for l = 0)."""
    return tl.sum(tl.where(r[None, :] == r[:, None] - 1, X, 0.0), axis=1)


@triton.jit
def sequence_range(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """Flat token range [bos, eos) of sequence i_n: a row of ``[B, T]``, or a packed sequence."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def gate_grads(dGam, dA, dBv, dE_last, dh, D_a, D_e, D_em, Em, m, a_prev, e_prev, r, last_row, is_last):
    """Backward of a tile's gate coefficients to its gates, shared by the chunk kernels.

    Forward (``[BT]`` gates ``a = 1 - alpha``, ``e = eta``, padding mask ``m``): ``D_a``, ``D_e``
    segment products ``[BT, BT]``, ``D_em = D_e * m[:, None]``, ``Em = cumprod(e) * m``,
    ``Gamma = D_a D_em``, ``B = D_a Em``, ``A = cumprod(a)``, ``E = cumprod(e)``, and ``h`` the last
    row of ``D_e``. Given the adjoints ``dGam`` ``[BT, BT]``, ``dA``, ``dBv`` ``[BT]``, the scalar
    adjoint ``dE_last`` of ``E`` at the tile's last token and ``dh`` ``[BT]``, returns
    ``(d a, d e)`` ``[BT]``. No division: ``d prod_{l=i+1..t} a_l / d a_l = D_a[l-1, i] D_a[t, l]``
    and ``d A_t / d a_l = A_{l-1} D_a[t, l]``, exact at gates 0 and 1. ``a_prev``, ``e_prev``: each
    row's previous gate within the tile (1 in row 0 and where there is no real previous token)."""
    dD_a = tl.dot(dGam, tl.trans(D_em), input_precision="ieee") + dBv[:, None] * Em[None, :]
    dD_e = tl.dot(tl.trans(D_a), dGam, input_precision="ieee") * m[:, None] + tl.where(last_row, dh[None, :], 0.0)
    dE = tl.sum(D_a * dBv[:, None], axis=0) * m + tl.where(is_last, dE_last, 0.0)
    RA = tl.dot(tl.dot(tl.trans(D_a), dD_a, input_precision="ieee"), tl.trans(D_a), input_precision="ieee")
    RE = tl.dot(tl.dot(tl.trans(D_e), dD_e, input_precision="ieee"), tl.trans(D_e), input_precision="ieee")
    da = subdiagonal(RA, r) + tl.cumprod(a_prev, axis=0) * tl.sum(D_a * dA[:, None], axis=0)
    de = subdiagonal(RE, r) + tl.cumprod(e_prev, axis=0) * tl.sum(D_e * dE[:, None], axis=0)
    return da, de


@triton.jit
def tile_gates(b_a, b_e, m, r, BT: tl.constexpr):
    """Gate coefficients of one tile (``common/chunk_gates.py``): D_a, D_e, Gamma ``[BT, BT]``;
    A, E, B, g (Gamma's last row), h (D_e's last row) ``[BT]``. ``m`` ``[BT]``: 1 on real tokens."""
    D_a = segment_products(b_a, r)  # [BT, BT]
    D_e = segment_products(b_e, r)
    A = tl.cumprod(b_a, axis=0)  # [BT]
    E = tl.cumprod(b_e, axis=0)
    Gam = tl.dot(D_a, D_e * m[:, None], input_precision="ieee")  # [BT, BT]
    Bv = tl.sum(D_a * (E * m)[None, :], axis=1)  # [BT]
    g = take_row(Gam, r, BT - 1)
    hh = take_row(D_e, r, BT - 1)
    return D_a, D_e, A, E, Gam, Bv, g, hh


@triton.jit
def clip_step(th, norm, max_norm):
    """Update clipping (``common/clipping.py``): the step ``c / norm`` where ``th * norm > c``, else
    ``th`` unchanged, and where it was clipped. The division runs only where clipped (there
    norm > 0): no 1/0 in the other branch."""
    clipped = th * norm > max_norm
    return tl.where(clipped, tl.div_rn(max_norm, tl.where(clipped, norm, 1.0)), th), clipped
