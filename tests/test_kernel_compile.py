"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 at the block sizes, warps and stages
the launchers use (``titans_layers/testing/kernel_builds.py``), and fits the GPU's shared memory:
a kernel that only the interpreter accepts fails here."""

import pytest

from titans_layers.testing.compile import compile_in_subprocess
from titans_layers.testing.kernel_builds import kernel_builds

BUILDS = kernel_builds()


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("build", BUILDS, ids=[f"{b.name}-{b.label}" for b in BUILDS])
def test_kernel_compiles_for_gpu(build, capability):
    usage = compile_in_subprocess(build.kernel, capability=capability, **build.compile_kwargs())
    assert 0 < usage["registers"] <= 255 and usage["shared"] >= 0


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
    assert len(kernels) == 7 and kernels == {b.kernel for b in BUILDS}
