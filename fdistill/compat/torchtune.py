"""torchtune's knowledge-distillation losses with torchtune's call conventions, computed by fdistill.

Drop-ins for ``torchtune.modules.loss`` ``ForwardKLLoss`` / ``ReverseKLLoss`` / ``SymmetricKLLoss`` and
their ``...WithChunkedOutputLoss`` forms (lists of ``(B, T_i, V)`` logit chunks, labels ``(B, T)``). With
``p`` the teacher's softmax and ``q`` the student's, per token not ignored:

* forward: ``-sum p log q`` -- the cross-entropy, i.e. ``KL(p || q) + H(p)``: torchtune's "forward KL"
  includes the teacher's entropy (same gradient as fdistill's ``forward_kl``, a larger value);
* reverse: ``KL(q || p)``;
* symmetric: ``sym_kd_ratio * forward + (1 - sym_kd_ratio) * reverse`` (ratio 1 is forward);

summed and divided by the tokens whose label is not ``ignore_index`` (``normalize=False``: the sum),
0 when every token is ignored. The chunked forms sum the chunks and divide once by the kept tokens of
all of ``labels``, split along T as the chunks are (torchtune's ``chunk`` / ``tensor_split`` of the
labels into ``num_output_chunks`` gives the same split for the chunks its recipes make).

All on the fused kernels: the KL terms are ``fdistill.divergence_loss`` rows (``forward_kl``,
``reverse_kl``, ``jeffreys`` with ``beta = 1 - sym_kd_ratio``) and ``H(p)`` is ``log V - KL(p || uniform)``
from the same kernel. Differences from torchtune: float64 logits give a float64 loss (torchtune
float32); where torchtune divides 0 by 0 (reverse / symmetric chunked with every token ignored) the
result is 0; torchtune drops the terms at student logits that are ``+-inf`` (a masked vocabulary), which
is the same here wherever the teacher is masked too, while a teacher with mass on a masked student
entry gives ``+inf`` here (torchtune drops that mass). A teacher that requires grad is differentiated, as
in torchtune (through fdistill's ``reference`` backend: not fused).
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses import divergence_loss
from ..validation import check_int, check_real
from ._common import promoted_pair, row_labels, safe_div, teacher_entropy_rows

__all__ = [
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "ReverseKLLoss",
    "ReverseKLWithChunkedOutputLoss",
    "SymmetricKLLoss",
    "SymmetricKLWithChunkedOutputLoss",
]


def _rows_sum(student, teacher, labels, ignore_index, ratio) -> torch.Tensor:
    """Sum over the kept tokens of ``ratio (KL(p || q) + H(p)) + (1 - ratio) KL(q || p)``."""
    s, t = promoted_pair("student_logits", student, "teacher_logits", teacher)
    vocab = s.shape[-1]
    s, t = s.reshape(-1, vocab), t.reshape(-1, vocab)
    flat = row_labels("labels", labels, s.shape[0], s.device, ignore_index)
    opts = dict(labels=flat, ignore_index=ignore_index, reduction="none", grad_teacher=t.requires_grad)
    if ratio == 1.0:
        rows = divergence_loss(s, t, "forward_kl", **opts)
    elif ratio == 0.0:
        rows = divergence_loss(s, t, "reverse_kl", **opts)
    else:  # jeffreys: (1 - beta) KL(p || q) + beta KL(q || p)
        rows = divergence_loss(s, t, "jeffreys", beta=1.0 - ratio, **opts)
    total = rows.sum()
    if ratio > 0:  # the teacher's entropy, which torchtune's forward term includes
        entropy = teacher_entropy_rows(t, flat, ignore_index, grad_teacher=t.requires_grad)
        total = total + ratio * entropy.sum()
    return total


class _KDLoss(nn.Module):
    _ratio = 1.0

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = check_int("ignore_index", ignore_index)

    def forward(self, student_logits, teacher_logits, labels, normalize: bool = True):
        """``student_logits`` / ``teacher_logits`` ``(..., V)``, ``labels`` one per token; the sum over the
        kept tokens, divided by their count when ``normalize`` (0 when there are none)."""
        if labels is None:
            raise TypeError("labels is required (the tokens equal to ignore_index are dropped)")
        total = _rows_sum(student_logits, teacher_logits, labels, self.ignore_index, self._ratio)
        if not normalize:
            return total
        return safe_div(total, (labels != self.ignore_index).sum())


class ForwardKLLoss(_KDLoss):
    """``torchtune.modules.loss.ForwardKLLoss(ignore_index=-100)``: ``-sum p log q`` per kept token."""


class ReverseKLLoss(_KDLoss):
    """``torchtune.modules.loss.ReverseKLLoss(ignore_index=-100)``: ``KL(q || p)`` per kept token."""

    _ratio = 0.0


def _check_ratio(sym_kd_ratio) -> float:
    return check_real("sym_kd_ratio", sym_kd_ratio, 0.0, 1.0)


class SymmetricKLLoss(_KDLoss):
    """``torchtune.modules.loss.SymmetricKLLoss(sym_kd_ratio=0.5, ignore_index=-100)``:
    ``sym_kd_ratio * forward + (1 - sym_kd_ratio) * reverse``."""

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__(ignore_index)
        self.sym_kd_ratio = self._ratio = _check_ratio(sym_kd_ratio)


class _ChunkedKDLoss(nn.Module):
    _ratio = 1.0

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100):
        super().__init__()
        self.num_output_chunks = check_int("num_output_chunks", num_output_chunks)
        if self.num_output_chunks < 1:
            raise ValueError(f"num_output_chunks must be >= 1, got {num_output_chunks}")
        self.ignore_index = check_int("ignore_index", ignore_index)

    def forward(self, student_logits, teacher_logits, labels):
        """Lists of ``(B, T_i, V)`` chunks (the same ``T_i`` for both), ``labels`` ``(B, sum T_i)``."""
        for name, chunks in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if not isinstance(chunks, (list, tuple)) or not chunks:
                raise TypeError(f"{name} must be a non-empty list of (B, T_i, V) logit chunks")
        if len(student_logits) != len(teacher_logits):
            raise ValueError(
                f"student_logits ({len(student_logits)} chunks) and teacher_logits "
                f"({len(teacher_logits)}) must have the same number of chunks"
            )
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ValueError("labels must be a (B, T) tensor")
        sizes = []
        for i, chunk in enumerate(student_logits):
            if not isinstance(chunk, torch.Tensor) or chunk.dim() != 3 or chunk.shape[0] != labels.shape[0]:
                raise ValueError(f"student_logits[{i}] must be (B, T_i, V) with B = {labels.shape[0]}")
            sizes.append(chunk.shape[1])
        if sum(sizes) != labels.shape[1]:
            raise ValueError(f"the chunks hold {sum(sizes)} positions, labels {labels.shape[1]}")
        total = sum(
            _rows_sum(s, t, lab, self.ignore_index, self._ratio)
            for s, t, lab in zip(student_logits, teacher_logits, labels.split(sizes, dim=1), strict=True)
        )
        return safe_div(total, (labels != self.ignore_index).sum())


class ForwardKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """``torchtune.modules.loss.ForwardKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)``:
    ``forward(student_logits: list, teacher_logits: list, labels)``."""


class ReverseKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """``torchtune.modules.loss.ReverseKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)``."""

    _ratio = 0.0


class SymmetricKLWithChunkedOutputLoss(_ChunkedKDLoss):
    """``torchtune.modules.loss.SymmetricKLWithChunkedOutputLoss(num_output_chunks=8, sym_kd_ratio=0.5,
    ignore_index=-100)``."""

    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__(num_output_chunks, ignore_index)
        self.sym_kd_ratio = self._ratio = _check_ratio(sym_kd_ratio)
