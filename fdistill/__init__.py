"""fdistill: fused divergence losses for LLM distillation and RLHF."""

from . import fdiv_ops as _fdiv_ops  # noqa: F401  (registers the f-divergence ops' fakes and autograd)
from ._extension import cpu_capability, has_cpu_kernels, has_cuda_kernels
from .fdiv import F_NAMES, FDIV_BACKENDS, FYLoss, f_softargmax, f_softmax, fy_loss
from .fused_linear import (
    TOPK_TAILS,
    VOCAB_MISMATCH,
    FusedLinearDivergenceLoss,
    FusedLinearFYLoss,
    fused_linear_divergence_loss,
    fused_linear_fy_loss,
)
from .losses import BACKENDS, DIVERGENCES, REDUCTIONS, DivergenceLoss, divergence_loss
from .reference import divergence_rows_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DIVERGENCES",
    "REDUCTIONS",
    "TOPK_TAILS",
    "VOCAB_MISMATCH",
    "DivergenceLoss",
    "FDIV_BACKENDS",
    "FYLoss",
    "FusedLinearDivergenceLoss",
    "FusedLinearFYLoss",
    "F_NAMES",
    "__version__",
    "cpu_capability",
    "divergence_loss",
    "divergence_rows_reference",
    "f_softargmax",
    "f_softmax",
    "fused_linear_divergence_loss",
    "fused_linear_fy_loss",
    "fy_loss",
    "has_cpu_kernels",
    "has_cuda_kernels",
]
