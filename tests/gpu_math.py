"""The GPU's approximate float32 math, imitated under the Triton interpreter.

On NVIDIA GPUs Triton lowers float32 ``exp`` to ``ex2.approx`` of ``x * log2(e)`` (the product rounded
to float32 first, so the relative error grows with |x|), ``log`` to ``lg2.approx`` times ln 2, ``/`` to
``div.full`` (2 ulp) and ``sqrt`` to ``sqrt.approx``. The interpreter computes all of them correctly
rounded in NumPy. :func:`gpu_approximate_math` patches the interpreter's builder so that float32 results
carry errors of the GPU's size (the documented maxima, with deterministic pseudo-random signs), which
shows the margins of the GPU tests' tolerances before a GPU is lent. float64 is left exact (libdevice).
"""

from __future__ import annotations

import contextlib

import numpy as np

LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
ULP = 2.0**-23  # float32 unit roundoff x 2


def _noise(shape, ulps: float, rng) -> np.ndarray:
    """Relative perturbations in [-ulps, ulps] float32 ulps."""
    return 1.0 + rng.uniform(-ulps, ulps, size=shape) * ULP


def _approx(fn_exact, ulps):
    def fn(x, rng):
        return (fn_exact(x.astype(np.float64)) * _noise(x.shape, ulps, rng)).astype(np.float32)

    return fn


def _exp(x, rng):
    y = x.astype(np.float32) * LOG2E  # rounded to float32, as the GPU's multiply
    return (np.exp2(y.astype(np.float64)) * _noise(x.shape, 2, rng)).astype(np.float32)


def _log(x, rng):
    with np.errstate(divide="ignore", invalid="ignore"):
        lg2 = np.log2(x.astype(np.float64))
    lg2 = lg2 + rng.uniform(-1, 1, size=x.shape) * 2.0**-22 * np.maximum(1.0, np.abs(lg2))
    return lg2.astype(np.float32) * LN2


@contextlib.contextmanager
def gpu_approximate_math(seed: int = 0):
    """Within the block, interpreted Triton kernels use GPU-like approximate float32 exp/log/div/sqrt."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    rng = np.random.default_rng(seed)
    names = ("create_exp", "create_log", "create_fdiv", "create_sqrt")
    saved = {name: getattr(builder, name) for name in names}

    def unary(exact, approx):
        def create(self, arg):
            out = exact(self, arg)
            if arg.data.dtype == np.float32:
                with np.errstate(all="ignore"):
                    out.data = approx(arg.data, rng)
            return out

        return create

    def create_fdiv(self, lhs, rhs):
        out = saved["create_fdiv"](self, lhs, rhs)
        if out.data.dtype == np.float32:
            with np.errstate(all="ignore"):
                out.data = (out.data.astype(np.float64) * _noise(out.data.shape, 2, rng)).astype(np.float32)
        return out

    builder.create_exp = unary(saved["create_exp"], _exp)
    builder.create_log = unary(saved["create_log"], _log)
    builder.create_sqrt = unary(saved["create_sqrt"], _approx(np.sqrt, 1))
    builder.create_fdiv = create_fdiv
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
