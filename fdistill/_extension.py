"""Loads the compiled extension fdistill._C, which registers the torch.ops.fdistill.* kernels."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch and libc10, which _C links against)

try:
    from . import _C  # noqa: F401  (importing registers the ops)

    IMPORT_ERROR: Exception | None = None
except ImportError as err:  # a source tree that was never built
    _C = None
    IMPORT_ERROR = err

BUILD_HINT = (
    "fdistill's C++ extension is not built; install with `pip install --no-build-isolation -e .` "
    "(it compiles against the torch already installed)"
)


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.with_cuda)


def require_extension() -> None:
    if _C is None:
        raise RuntimeError(f"{BUILD_HINT}; import failed with: {IMPORT_ERROR}")


def cpu_capability(refresh: bool = False) -> str:
    """The instruction set the CPU kernels use: ``default``, ``avx2`` or ``avx512``.

    Capped by the environment variable ``FDISTILL_CPU_CAPABILITY`` (else ``ATEN_CPU_CAPABILITY``);
    pass ``refresh=True`` after changing it in a running process.
    """
    require_extension()
    return _C.cpu_capability(refresh)
