"""A validated f-divergence call (:func:`prepare`): the logits as ``[rows, V]`` rows, the canonical
generator f and its alpha, the reference measure, the backend and the op options. Shared by
:mod:`fdistill.fdiv` and :mod:`fdistill.vocab_parallel` (which imports nothing else of fdiv)."""

from __future__ import annotations

import numbers

import torch

from . import fdiv_reference as ref
from ._extension import has_cpu_kernels, has_cuda_kernels, require_extension
from ._triton_dispatch import check_triton_device, triton_available
from ._value_checks import ValueChecks
from .ops import accumulate_dtype
from .validation import FLOAT_DTYPES, check_choice, check_n_iter, check_real, check_reference

F_NAMES = ref.F_NAMES

FDIV_BACKENDS = ("reference", "cpu", "cuda", "triton")

DEFAULT_MAX_SWEEPS = 100


class FDivCall:
    """A validated call: logits as [rows, V] rows, the reference, the backend and the op options."""

    def __init__(self, logits, family, alpha, reference, dim, n_iter, backend):
        self.family, self.alpha = family, alpha
        moved = logits.movedim(dim, -1)
        self.moved_shape = moved.shape
        self.dim = dim
        self.lead_shape = moved.shape[:-1]
        self.vocab = moved.shape[-1]
        rows = moved.reshape(-1, self.vocab)
        self.rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        self.acc = accumulate_dtype(logits.dtype)
        self.backend = backend
        self.max_sweeps = DEFAULT_MAX_SWEEPS if n_iter is None else int(n_iter)
        self.ref_iters = 80 if n_iter is None else int(n_iter)
        self.reference = reference
        self.ref_tensor = None
        self.reference_value = 1.0
        if isinstance(reference, str):
            self.reference_value = 1.0 / self.vocab if reference == "uniform" else 1.0
        else:
            q = reference.to(self.acc)
            q = q.movedim(dim, -1) if q.dim() == logits.dim() else q
            q = q.expand(self.moved_shape).reshape(-1, self.vocab)
            self.ref_tensor = q if q.stride(-1) == 1 else q.contiguous()

    def reference_arg(self):
        return self.reference if self.ref_tensor is None else self.ref_tensor

    def op(self):
        if self.backend == "triton":
            from .triton import fdiv as triton_fdiv

            return triton_fdiv.fdiv_forward_op()
        return torch.ops.fdistill.fdiv_fwd  # the C++ op; CPU or CUDA by the tensors' device

    def options(self, temperature, mode, ignore_index=-100):
        tol = 1e-12 if self.acc == torch.float64 else 1e-7
        f = "alpha" if self.family == "alpha" else self.family
        return (f, float(self.alpha), float(self.reference_value), float(temperature), int(ignore_index),
                self.max_sweeps, tol, mode)  # fmt: skip

    def restore(self, p):
        return p.reshape(self.moved_shape).movedim(-1, self.dim)


def prepare(logits, f, alpha, reference, dim, n_iter, backend, checks: ValueChecks | None = None) -> FDivCall:
    """The validated call; value checks are added to ``checks`` (raised by the caller, one sync for
    all), or raised here when it is None."""
    own = checks is None
    checks = ValueChecks() if own else checks
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() == 0 or logits.numel() == 0 and logits.shape[dim] == 0:
        raise ValueError(f"logits need a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if not isinstance(dim, numbers.Integral) or not -logits.dim() <= dim < logits.dim():
        raise ValueError(f"dim must be an int in [-{logits.dim()}, {logits.dim()}), got {dim!r}")
    check_choice("f", f, F_NAMES)
    check_real("alpha", alpha)
    family, alpha = ref.canonical_f(f, float(alpha))
    if family == "alpha" and not (alpha > 0 and alpha != 1):
        raise ValueError(f"alpha must be > 0 and != 1 (alpha -> 1 is f='kl'), got {alpha}")
    check_n_iter(n_iter)
    check_reference(reference, logits, dim, checks)
    call = FDivCall(logits, family, alpha, reference, dim, n_iter, pick_backend(backend, logits))
    if own:
        checks.raise_first()
    return call


def pick_backend(backend, logits) -> str:
    device = logits.device.type
    if backend is None:
        if device == "cpu":
            return "cpu" if has_cpu_kernels() else "reference"
        if device == "cuda" and has_cuda_kernels():
            return "cuda"
        return "triton" if device == "cuda" and triton_available() else "reference"
    check_choice("backend", backend, FDIV_BACKENDS)
    if backend == "cpu":
        if device != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got logits on {logits.device}")
        require_extension()
    if backend == "cuda" and (device != "cuda" or not has_cuda_kernels()):
        raise ValueError(
            f"backend='cuda' needs CUDA tensors and the CUDA build of fdistill (logits on {device})"
        )
    if backend == "triton":
        check_triton_device(logits.device)
    return backend
