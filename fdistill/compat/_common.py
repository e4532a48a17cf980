"""Shared checks and helpers of the compatibility layer."""

from __future__ import annotations

import math

import torch

from ..losses import divergence_loss
from ..validation import check_float, check_int, check_same_shape_and_device


def promoted_pair(s_name, student, t_name, teacher, *, two_d=False):
    """(student, teacher) of one shape, cast to their promoted dtype (the peers promote mixed dtypes;
    fdistill's core raises)."""
    check_float(s_name, student)
    check_float(t_name, teacher)
    if two_d and student.dim() != 2:
        raise ValueError(f"{s_name} must be (BT, V), got shape {tuple(student.shape)}")
    check_same_shape_and_device(s_name, student, t_name, teacher)
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    return student.to(dtype), teacher.to(dtype)


def row_labels(name: str, labels, rows: int, device, ignore_index) -> torch.Tensor | None:
    """``labels`` as ``[rows]`` int64 (or None): the peers' per-token ignore mask."""
    check_int("ignore_index", ignore_index)
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.numel() != rows:
        raise ValueError(f"{name} must hold one label per token ({rows}), got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} ({labels.device}) and the logits ({device}) are on different devices")
    return labels.reshape(-1).long()


def count_kept(labels, ignore_index, rows: int):
    """Tokens not ignored: a tensor with labels, ``rows`` without."""
    return rows if labels is None else (labels != ignore_index).sum()


def safe_div(total: torch.Tensor, count) -> torch.Tensor:
    """``total / count``, 0 when ``count`` is 0 (where a peer would divide 0 by 0)."""
    if isinstance(count, torch.Tensor):
        return total / count.clamp_min(1)
    return total / max(count, 1)


def teacher_entropy_rows(teacher, labels, ignore_index, *, temperature=1.0, grad_teacher=False):
    """Per-row entropy ``H(softmax(teacher / T))`` on the fused kernel, as ``log V - KL(p || uniform)``
    (the uniform student is one row of zeros broadcast with stride 0: nothing is allocated)."""
    vocab = teacher.shape[-1]
    rows = teacher.reshape(-1, vocab)
    zeros = rows.new_zeros(1, vocab).expand(rows.shape[0], vocab)
    kl_uniform = divergence_loss(
        zeros, rows, "forward_kl", temperature=temperature, labels=labels, ignore_index=ignore_index,
        reduction="none", grad_teacher=grad_teacher,
    )  # fmt: skip
    entropy = math.log(vocab) - kl_uniform
    if labels is not None:
        entropy = torch.where(labels != ignore_index, entropy, torch.zeros_like(entropy))
    return entropy
