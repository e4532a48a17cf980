"""The comparison of the GPU tests (tests/test_gpu.py), on any device.

CUDA float32 exp / log / divide are approximate and the vocabulary is 100x the CPU tests', so losses
get tolerances of 1e-4 and gradients the bfloat16 rule (1 ulp of bfloat16) plus a per-row relative
error of the whole gradient row (an entry-wise absolute tolerance would say nothing about entries of
size 1 / V). Rows whose exact gradient is 0 (e.g. skew_reverse_kl at skew = 1, where m = q) get an
absolute floor of a float32 rounding of the upstream gradient instead of 0.
"""

from __future__ import annotations

import torch
from utils import (
    assert_close_verbose,
    loss_and_grad,
    oracle_loss_and_grad,
    param_of,
    reference_rows64,
    tolerances,
)

LOSS_TOL = 1e-4  # absolute and relative, float32 arithmetic with approximate exp / log over 1e5 entries
ROW_REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # |grad - ref|_2 / |ref|_2
ROW_ABS_FLOOR = 1e-6  # x the gradient's unit (upstream weight / T): rows whose exact gradient is 0


def check_gpu(student, teacher, divergence, options, *, weight=None, reduction="none", **kwargs):
    """backend="triton" vs the float64 reference: loss, gradient entries, gradient rows. Returns the
    margins: the largest error / tolerance of the loss, the entries and the rows (each <= 1)."""
    dtype = student.dtype
    labels = kwargs.get("labels")
    temperature = kwargs.get("temperature", 1.0)
    loss, grad = loss_and_grad(
        student, teacher, divergence, options, reduction, weight, backend="triton", **kwargs
    )
    want_loss, want_grad = oracle_loss_and_grad(
        student, teacher, divergence, options, reduction, weight, **kwargs
    )
    assert loss.device == student.device and grad.device == student.device
    assert grad.dtype == dtype and grad.shape == student.shape
    count = student[..., 0].numel() if labels is None else int((labels != -100).sum())
    margins = {}
    if reduction == "none":
        loss_atol = loss_rtol = LOSS_TOL
    else:  # the error of a sum grows with the sum of the magnitudes
        rows = reference_rows64(
            student, teacher, divergence, param_of(divergence, options), temperature, labels
        )
        tol = LOSS_TOL * (rows.numel() + rows.abs().sum().item())
        loss_atol, loss_rtol = (tol / max(count, 1) if reduction == "mean" else tol), 0.0
    assert_close_verbose(loss, want_loss, loss_atol, loss_rtol, "loss")
    margins["loss"] = _margin(loss.double(), want_loss.double(), loss_atol, loss_rtol)
    # entries: the bfloat16 rule of the CPU tests, with room for approximate exp / log
    _, _, grad_atol, grad_rtol = tolerances(torch.bfloat16, slack=10.0)
    unit = {"none": weight.abs().max().item() if weight is not None else 1.0, "sum": 1.0}.get(
        reduction, 1.0 / max(count, 1)
    )
    gscale = max(want_grad.abs().max().item(), unit / temperature)
    assert_close_verbose(grad, want_grad.to(dtype), grad_atol * gscale, grad_rtol, "grad")
    margins["grad"] = _margin(grad.double(), want_grad.to(dtype).double(), grad_atol * gscale, grad_rtol)
    # rows: the relative error of each gradient row as a whole, with a floor for exactly-zero rows
    rows_want = want_grad.reshape(-1, want_grad.shape[-1])
    rows_err = (grad.double() - want_grad).reshape(rows_want.shape).norm(dim=-1)
    allowed = ROW_REL_TOL[dtype] * rows_want.norm(dim=-1) + ROW_ABS_FLOOR * unit / temperature
    bad = ~(rows_err <= allowed)
    rel = rows_err / rows_want.norm(dim=-1)
    assert not bad.any(), (
        f"gradient rows beyond {ROW_REL_TOL[dtype]:g} relative error: "
        f"rows {bad.nonzero().flatten().tolist()}, relative errors {rel[bad].tolist()}"
    )
    margins["rows"] = (rows_err / allowed).max().item() if rows_err.numel() else 0.0
    return loss, grad, margins


def _margin(actual, expected, atol, rtol) -> float:
    """max |actual - expected| / (atol + rtol |expected|) over finite entries (0 when none)."""
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    if not finite.any():
        return 0.0
    err = (actual - expected)[finite].abs()
    return (err / (atol + rtol * expected[finite].abs())).max().item()
