"""Lazy access to the Triton backend: triton is imported on first use, not with fdistill.

Importing triton late matters for ``TRITON_INTERPRET=1``, which triton reads when it is imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(device: torch.device, name: str = "student_logits") -> None:
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return
    raise ValueError(
        f"backend='triton' needs CUDA tensors (got {name} on {device}); CPU tensors run only "
        "under the Triton interpreter, with TRITON_INTERPRET=1 set before triton is imported"
    )


def triton_forward_op(with_grad: bool = False, in_place: bool = False):
    """torch.ops.fdistill.divergence_fwd_triton, or the one-pass divergence_fwd_grad_triton (its
    in-place form with ``in_place``), registering the Triton ops on first use."""
    from .triton import divergence  # noqa: F401  (defines and registers the ops; a no-op once done)

    ops = torch.ops.fdistill
    if not with_grad:
        return ops.divergence_fwd_triton
    return ops.divergence_fwd_grad_triton_ if in_place else ops.divergence_fwd_grad_triton
