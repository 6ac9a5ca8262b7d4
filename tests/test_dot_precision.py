"""``triton_utils.mm``, the one product every chunk kernel takes: each PRECISION rounds its
operands as documented (on a GPU by the hardware, under the interpreter by exact float32
emulations), accumulating in float32."""

import pytest
import torch
import triton
import triton.language as tl

from titans_layers.ops.common.triton_utils import mm, runnable_precision

N = 32


@triton.jit
def mm_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr, PRECISION: tl.constexpr):
    r = tl.arange(0, N)
    offs = r[:, None] * N + r[None, :]
    c = mm(tl.load(a_ptr + offs).to(tl.float32), tl.load(b_ptr + offs).to(tl.float32), PRECISION)
    tl.store(c_ptr + offs, c)


def truncated_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 with its 13 low mantissa bits cleared: what a tf32 MMA reads of a float32 operand."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


# PRECISION -> its operands' rounding, in torch
ROUNDINGS = {"ieee": lambda x: x, "tf32": truncated_tf32, "bf16": lambda x: x.bfloat16().float(),
             "fp16": lambda x: x.half().float()}


@pytest.mark.parametrize("precision", list(ROUNDINGS))
def test_mm_rounds_operands_as_documented(precision, device):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(N, N, generator=g, dtype=torch.float64).float().to(device) for _ in range(2))
    c = torch.full((N, N), float("nan"), device=device)
    mm_kernel[(1,)](a, b, c, N=N, PRECISION=runnable_precision(precision))
    roundings = [ROUNDINGS[precision]]
    if precision == "tf32" and device == "cuda":  # the PTX has no cvt.rna.tf32, but allow the MMA to round
        roundings.append(lambda x: ((x.view(torch.int32) + 0xFFF) & ~0x1FFF).view(torch.float32))
    errors = []
    for rounded in roundings:
        expected = rounded(a).double() @ rounded(b).double()  # products of rounded operands, exact
        errors.append((c.double() - expected).abs().max().item())
    scale = expected.abs().max().item()
    assert min(errors) <= 1e-6 * scale, errors  # only the float32 accumulation differs
    if precision != "ieee":  # and the rounding is really applied: full-precision products differ more
        assert (c.double() - a.double() @ b.double()).abs().max().item() > 1e-5 * scale

