"""Self-check and timing table of the op implementations on this machine.

    python -m titans_layers.bench            # CUDA if present, else CPU
    TRITON_INTERPRET=1 python -m titans_layers.bench   # CPU, Triton kernels under the interpreter

First every implementation is checked against the float64 per-token reference (outputs, final
states, all gradients) and the worst relative errors are printed with the SPEC tolerance; then
forward and forward+backward are timed at one larger shape. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from titans_layers.ops import (chunk_mlp_memory, chunk_momentum_delta_rule, fused_recurrent_mlp_memory,
                               fused_recurrent_momentum_delta_rule, naive_chunk_mlp_memory,
                               naive_chunk_momentum_delta_rule, naive_recurrent_mlp_memory,
                               naive_recurrent_momentum_delta_rule)
from titans_layers.ops.common.triton_utils import is_interpreting
from titans_layers.testing.cases import make_case
from titans_layers.testing.compare import tolerance
from titans_layers.testing.contract import check_against_reference

# name -> (implementation, op family)
IMPLS = {
    "linear naive_recurrent": (naive_recurrent_momentum_delta_rule, "linear"),
    "linear naive_chunk": (naive_chunk_momentum_delta_rule, "linear"),
    "linear chunk (Triton)": (chunk_momentum_delta_rule, "linear"),
    "linear fused_recurrent (Triton)": (fused_recurrent_momentum_delta_rule, "linear"),
    "mlp naive_recurrent": (naive_recurrent_mlp_memory, "mlp"),
    "mlp naive_chunk": (naive_chunk_mlp_memory, "mlp"),
    "mlp chunk (Triton)": (chunk_mlp_memory, "mlp"),
    "mlp fused_recurrent (Triton)": (fused_recurrent_mlp_memory, "mlp"),
}
TRITON = {name for name in IMPLS if "Triton" in name}
# the per-token MLP reference takes a gradient per token: time it on short inputs only
SLOW = {"linear naive_recurrent": 4096, "mlp naive_recurrent": 512}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def runs_here(name: str, device: torch.device) -> bool:
    """Triton ops need CUDA, or the interpreter on CPU."""
    return name not in TRITON or device.type == "cuda" or is_interpreting()


def self_check(device: torch.device, chunk_size: int) -> bool:
    """Print the worst relative error of each implementation and dtype; True if all pass."""
    print(f"\n## Correctness against the float64 reference (chunk_size={chunk_size})\n")
    print("| implementation | dtype | outputs+states | gradients | tolerance (out / grad) | verdict |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    ok = True
    for name, (impl, family) in IMPLS.items():
        if not runs_here(name, device):
            print(f"| {name} | - | - | - | - | skipped: needs CUDA or TRITON_INTERPRET=1 |")
            continue
        for dname, dtype in DTYPES.items():
            case = make_case(seed=0, B=2, T=2 * chunk_size + 37, H=2, K=32, V=48, dtype=dtype,
                             chunk_size=chunk_size, state="MS", extremes=0.1, family=family, hidden=64,
                             device=device)
            tol_out, tol_grad = tolerance(dtype, device, "output"), tolerance(dtype, device, "grad")
            try:
                errors = check_against_reference(impl, case)
                worst_out = max(v for k, v in errors.items() if not k.startswith("d"))
                worst_grad = max(v for k, v in errors.items() if k.startswith("d"))
                verdict = "ok"
            except AssertionError as e:
                worst_out = worst_grad = float("nan")
                verdict = f"FAIL: {e}"
                ok = False
            print(f"| {name} | {dname} | {worst_out:.1e} | {worst_grad:.1e} | {tol_out:.0e} / {tol_grad:.0e} "
                  f"| {verdict} |")
    return ok


def _time(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn()`` in ms."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, quantiles=[0.5])
    fn()  # warm-up (compiles, caches)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def timing(device: torch.device, B: int, T: int, H: int, D: int, chunk_size: int, dtype: torch.dtype,
           reps: int) -> None:
    """Print forward and forward+backward times of each implementation at one shape."""
    print(f"\n## Speed: B={B} T={T} H={H} K=V={D} chunk_size={chunk_size} {dtype} on {device}"
          f"{' (Triton interpreted: not a speed measurement)' if is_interpreting() else ''}\n")
    print("| implementation (MLP: Dh = 4K) | forward (ms) | forward+backward (ms) |")
    print("| --- | ---: | ---: |")
    for name, (impl, family) in IMPLS.items():
        if not runs_here(name, device):
            print(f"| {name} | skipped | skipped |")
            continue
        if name.startswith("mlp") and name in TRITON and device.type != "cuda":
            print(f"| {name} | skipped (interpreted MLP kernels take minutes; checked above) | skipped |")
            continue
        if T > SLOW.get(name, T):
            print(f"| {name} | skipped (T > {SLOW[name]}) | skipped |")
            continue
        case = make_case(seed=1, B=B, T=T, H=H, K=D, V=D, dtype=dtype, chunk_size=chunk_size, family=family,
                         hidden=4 * D, device=device)
        leaves = [x.detach().clone().requires_grad_() for x in case.inputs]
        kwargs = dict(chunk_size=chunk_size, initial_state=case.initial_state, **case.extra)
        do = torch.randn(B, T, H, D, device=device, dtype=dtype)

        def forward():
            with torch.no_grad():
                impl(*leaves, **kwargs)

        def forward_backward():
            o, _ = impl(*leaves, **kwargs)
            torch.autograd.backward(o, do)

        print(f"| {name} | {_time(forward, device, reps):.2f} | {_time(forward_backward, device, reps):.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=16, help="16, 32 or 64 (the Triton kernels' sizes)")
    parser.add_argument("--batch", type=int, default=None, help="timing batch size")
    parser.add_argument("--seqlen", type=int, default=None, help="timing sequence length")
    parser.add_argument("--heads", type=int, default=None, help="timing head count")
    parser.add_argument("--head-dim", type=int, default=64, help="timing K = V")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="timing dtype")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    print(f"# titans_layers self-check on {torch.cuda.get_device_name(device) if gpu else 'CPU'}"
          f"{' (Triton interpreter)' if is_interpreting() and not gpu else ''}")
    ok = self_check(device, args.chunk_size)
    small_cpu = not gpu and is_interpreting()  # interpreted kernels: keep the timed shape small
    timing(device, B=args.batch or (4 if gpu else 1), T=args.seqlen or (4096 if gpu else 256 if small_cpu else 2048),
           H=args.heads or (16 if gpu else 2 if small_cpu else 4), D=args.head_dim, chunk_size=args.chunk_size,
           dtype=DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32), reps=args.reps)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
