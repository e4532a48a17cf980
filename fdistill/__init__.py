"""fdistill: fused divergence losses for LLM distillation and RLHF."""

from ._extension import cpu_capability, has_cpu_kernels, has_cuda_kernels
from .losses import BACKENDS, DIVERGENCES, REDUCTIONS, DivergenceLoss, divergence_loss
from .reference import divergence_rows_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DIVERGENCES",
    "REDUCTIONS",
    "DivergenceLoss",
    "__version__",
    "cpu_capability",
    "divergence_loss",
    "divergence_rows_reference",
    "has_cpu_kernels",
    "has_cuda_kernels",
]
