"""Fused-linear losses: from hidden states and LM heads to the loss without holding the logits.

The logits of a chunk of tokens are formed, reduced to their loss and gradient by the fused row
kernels of :func:`fdistill.divergence_loss` / :func:`fdistill.fy_loss`, and dropped (see
``chunked_head.py``). The teacher is given as its own head (hidden states + weight), as logits, or as
stored top-k log-probabilities.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _topk_teacher as topk_teacher
from ._topk_teacher import TOPK_TAILS
from ._value_checks import ValueChecks
from .chunked_head import ChunkedLoss, LMHead, chunked_head_loss, default_chunk_size, head_dtype
from .fdiv import fy_rows
from .fdiv_call import prepare
from .losses import DIVERGENCES, REDUCTIONS, pick_backend
from .ops import accumulate_dtype
from .rows import DivergenceRows
from .validation import (
    check_choice,
    check_chunk_size,
    check_float,
    check_head,
    check_no_vocab_size,
    check_probabilities,
    check_real,
    check_reference_values,
    check_temperature,
    check_token_ids,
    check_topk,
    check_topk_values,
    divergence_param,
)

VOCAB_MISMATCH = ("error", "mask")


def fused_linear_divergence_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    topk_tail: str = "renormalize",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_loss_weight: float = 0.0,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_mismatch: str = "error",
    scale_by_temperature_squared: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
    vocab_parallel_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    r"""``divergence_loss(softcap(student_hidden @ student_weight.T + student_bias), teacher, ...)``
    ``+ hard_loss_weight * cross_entropy(student logits, labels)``, computed chunk by chunk.

    Peak memory beyond the inputs and the parameter gradients is a few ``chunk_size x V`` buffers,
    whatever the number of tokens. Gradients flow to ``student_hidden``, ``student_weight`` and
    ``student_bias``; the teacher is a constant (its tensors are used detached, even if they require
    grad). With ``reduction`` ``mean`` / ``sum`` the gradient is computed during the forward pass when
    a student input requires grad (one pass over the vocabulary; the backward only scales it); with
    ``none`` the backward recomputes the logits. Under ``torch.no_grad()`` no gradient work is done.

    Args:
        student_hidden: ``(..., H)`` hidden states (the input of the student's LM head).
        student_weight: ``(V, H)`` LM-head weight; ``student_bias``: ``(V,)`` or None.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's head, ``(..., H_t)``,
            ``(V_t, H_t)``, ``(V_t,)``. Exactly one teacher source is given: this head, ...
        teacher_logits: ... ``(..., V_t)`` logits, ...
        teacher_topk: ... or ``(indices, logprobs)``, both ``(..., k)``: the teacher's top-k token ids
            (distinct within a token, in ``[0, V)``) and their log-probabilities (offline distillation
            from stored top-k; tokens ignored through ``labels`` may hold anything there, e.g.
            padding). ``topk_tail`` says what the remaining mass is:

            * ``"renormalize"`` (default): the teacher is its top-k renormalised (every other token
              has probability 0, as a ``-inf`` logit); the student keeps its full distribution. With
              a temperature the teacher is ``p_i^(1/T)`` renormalised over the top-k.
            * ``"bucket"``: the tail ``1 - sum(top-k p)`` is one outcome, matched by the student's
              total probability outside the top-k: the divergence is taken between the two
              ``(k + 1)``-outcome distributions. Needs ``temperature=1`` (the teacher's tempered
              tail is unknown) and ``sum(top-k p) <= 1``.
        divergence, beta, skew, alpha, temperature, scale_by_temperature_squared: as
            :func:`fdistill.divergence_loss`, on the (soft-capped) logits.
        labels: ``(...)`` token ids; tokens equal to ``ignore_index`` contribute 0 to both losses and
            are not counted by ``mean``.
        hard_loss_weight: weight >= 0 of the cross-entropy of the student's logits (temperature 1,
            full student vocabulary) on ``labels``, added to the divergence (needs ``labels``).
        softcap: ``c > 0`` caps the student's logits as ``c tanh(z / c)`` (Gemma 2) before the
            temperature; ``teacher_softcap`` does the same for logits computed from the teacher's
            head (logits given as ``teacher_logits`` are used as they are).
        vocab_mismatch: ``"error"`` (default) rejects a teacher vocabulary ``V_t != V``; ``"mask"``
            compares the distributions on the shared ids ``[0, min(V, V_t))``: the entries beyond it
            are ``-inf`` on both sides (no probability mass, zero gradient), never zeros. Top-k ids
            ``>= V`` are dropped under ``"mask"`` and rejected otherwise. The hard loss always uses
            the student's full vocabulary.
        reduction: ``mean`` (over tokens not ignored; 0 when all are), ``sum`` or ``none`` (``(...)``).
        chunk_size: tokens per chunk; default :func:`fdistill.chunked_head.default_chunk_size` of
            ``V`` and ``H`` (``chunk x V`` about 2^24 logits on the CPU, 2^26 on a GPU).
        backend: the row kernels, as :func:`fdistill.divergence_loss`; the matmuls are PyTorch's
            (oneDNN / cuBLAS).
        vocab_parallel_group: a ``torch.distributed`` process group over which the LM heads are
            sharded by vocabulary rows (see :mod:`fdistill.vocab_parallel`): ``student_weight`` /
            ``student_bias`` are this rank's contiguous rows ``(V_local, H)`` / ``(V_local,)``, the
            teacher is its head sharded the same way (``teacher_weight`` ``(V_local, H_t)``) or its
            logit shards ``(..., V_local)``; the hidden states, labels and options are the same on
            every rank. Each chunk's shard logits go through the vocabulary-parallel row losses; the
            gradient of ``student_hidden`` is a partial sum over the shard that is all-reduced (SUM)
            over the group in the backward, the weight and bias gradients stay on their rank.
            Supported: every divergence and parameter, temperature, labels, ``hard_loss_weight`` (the
            cross-entropy over the whole vocabulary), softcaps, reductions, ``chunk_size`` (by
            default from the largest shard). Not supported: ``teacher_topk``,
            ``vocab_mismatch="mask"``, and ``backend`` other than None / ``"reference"``.
        vocab_size: with ``vocab_parallel_group``, the full V, checked against the sum of the shards.

    Under ``torch.autocast`` the head matmuls run in the autocast dtype (the logits are in that
    dtype, the loss accumulates in float32) and gradients come back in the inputs' dtypes.
    """
    if vocab_parallel_group is not None:
        from . import vocab_parallel

        return vocab_parallel.fused_linear_divergence_loss(
            student_hidden, student_weight, student_bias=student_bias, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
            teacher_topk=teacher_topk, topk_tail=topk_tail, divergence=divergence, beta=beta, skew=skew,
            alpha=alpha, temperature=temperature, labels=labels, ignore_index=ignore_index,
            hard_loss_weight=hard_loss_weight, softcap=softcap, teacher_softcap=teacher_softcap,
            vocab_mismatch=vocab_mismatch, scale_by_temperature_squared=scale_by_temperature_squared,
            reduction=reduction, chunk_size=chunk_size, backend=backend, group=vocab_parallel_group,
            vocab_size=vocab_size,
        )  # fmt: skip
    check_no_vocab_size(vocab_size)
    check_choice("divergence", divergence, DIVERGENCES)
    divergence_param(divergence, beta=beta, skew=skew, alpha=alpha)
    check_temperature(temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("topk_tail", topk_tail, TOPK_TAILS)
    check_choice("vocab_mismatch", vocab_mismatch, VOCAB_MISMATCH)
    check_real("hard_loss_weight", hard_loss_weight)
    if hard_loss_weight < 0:
        raise ValueError(f"hard_loss_weight must be >= 0, got {hard_loss_weight}")
    if hard_loss_weight > 0 and labels is None:
        raise ValueError("hard_loss_weight > 0 needs labels (the cross-entropy targets)")
    head_args = check_head("student", student_hidden, student_weight, student_bias, softcap)
    lead, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    checks = ValueChecks()  # every value check of the call, read with one host sync
    flat_labels = check_token_ids(labels, lead, vocab, ignore_index, student_hidden.device, checks)
    backend = pick_backend(backend, student_hidden, False, name="student_hidden")
    student = LMHead(*head_args, softcap, head_dtype(student_hidden, student_weight))

    keep = None if flat_labels is None else flat_labels != ignore_index
    teacher = _teacher(student, lead, vocab, vocab_mismatch, topk_tail, temperature, keep,
                       teacher_hidden, teacher_weight, teacher_bias, teacher_softcap,
                       teacher_logits, teacher_topk, checks)  # fmt: skip
    checks.raise_first()
    param = divergence_param(divergence, beta=beta, skew=skew, alpha=alpha)
    factor = temperature * temperature if scale_by_temperature_squared else 1.0
    spec = DivergenceRows(divergence, param, temperature, int(ignore_index), backend, factor)
    rows_fn = (_bucket_rows if teacher.bucket else _DenseRows)(teacher, spec, flat_labels)
    loss = ChunkedLoss(student, rows_fn, _chunk_size(chunk_size, student), reduction, flat_labels,
                       int(ignore_index), float(hard_loss_weight))  # fmt: skip
    out = chunked_head_loss(loss, *head_args)
    return out.reshape(lead) if reduction == "none" else out


def fused_linear_fy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    f: str = "alpha",
    *,
    bias: torch.Tensor | None = None,
    alpha: float = 1.5,
    reference="uniform",
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    n_iter: int | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    vocab_parallel_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``fy_loss(softcap(hidden @ weight.T + bias), target, f, ...)`` computed chunk by chunk.

    ``target`` is ``(...)`` integer labels or ``(..., V)`` probabilities (a teacher's); ``reference``
    is ``"uniform"``, ``"unit"``, a ``(V,)`` tensor or one of the logits' shape ``(..., V)``. The
    other options are those of :func:`fdistill.fy_loss` and :func:`fused_linear_divergence_loss`
    (memory, gradients, autocast); ``backend`` also accepts ``"cuda"``.

    ``vocab_parallel_group``: ``weight`` / ``bias`` are this rank's contiguous vocabulary rows
    ``(V_local, H)`` / ``(V_local,)`` (see :mod:`fdistill.vocab_parallel`); labels are ids in the
    whole vocabulary, a probability target and a tensor ``reference`` are this rank's shards
    (``(..., V_local)``, ``(V_local,)``); ``"uniform"`` is 1/V of the whole vocabulary. Every option
    is supported except ``backend`` other than None / ``"reference"``; the gradient of ``hidden`` is
    all-reduced (SUM) over the group in the backward. ``vocab_size``: the full V, checked.
    """
    if vocab_parallel_group is not None:
        from . import vocab_parallel

        return vocab_parallel.fused_linear_fy_loss(
            hidden, weight, target, f, bias=bias, alpha=alpha, reference=reference, temperature=temperature,
            ignore_index=ignore_index, softcap=softcap, reduction=reduction, n_iter=n_iter,
            chunk_size=chunk_size, backend=backend, group=vocab_parallel_group, vocab_size=vocab_size,
        )  # fmt: skip
    check_no_vocab_size(vocab_size)
    head_args = check_head("", hidden, weight, bias, softcap)
    lead, vocab = hidden.shape[:-1], weight.shape[0]
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"target must be a torch.Tensor (labels or probabilities), got {type(target).__name__}"
        )
    labels = probs = None
    checks = ValueChecks()  # every value check of the call, once for the batch: one host sync
    if target.dtype.is_floating_point:
        if target.shape != (*lead, vocab):
            raise ValueError(f"probability target {tuple(target.shape)} must be (..., V) = {(*lead, vocab)}")
        probs = target.detach().reshape(-1, vocab)
        probs = probs if probs.stride(-1) == 1 else probs.contiguous()
        check_probabilities(probs, checks)
    else:
        labels = check_token_ids(target, lead, vocab, ignore_index, hidden.device, checks, name="target")
    per_token_reference = isinstance(reference, torch.Tensor) and reference.dim() > 1
    if per_token_reference:
        if reference.shape != (*lead, vocab):
            raise ValueError(
                f"reference {tuple(reference.shape)} must be (V,) or (..., V) = {(*lead, vocab)}"
            )
        reference = reference.reshape(-1, vocab)
    check_temperature(temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    head = LMHead(*head_args, softcap, head_dtype(hidden, weight))
    # f, alpha, reference, n_iter and backend are checked as fy_loss checks them, on zero tokens;
    # a tensor reference's values once for the batch
    empty = head_args[0].new_empty((0, vocab), dtype=head.logits_dtype)
    backend = prepare(empty, f, alpha, reference[:0] if per_token_reference else reference, -1, n_iter,
                       backend, checks).backend  # fmt: skip
    if per_token_reference:
        check_reference_values(reference, checks)
    checks.raise_first()
    checked = ValueChecks(enabled=False)  # per chunk: nothing more to read

    def rows_fn(z, rows):
        q = reference[rows] if per_token_reference else reference
        call = prepare(z, f, alpha, q, -1, n_iter, backend, checked)
        y = probs[rows].to(z.dtype) if probs is not None else None
        return fy_rows(call, None if labels is None else labels[rows], y, ignore_index, temperature)

    loss = ChunkedLoss(head, rows_fn, _chunk_size(chunk_size, head), reduction, labels, int(ignore_index))
    out = chunked_head_loss(loss, *head_args)
    return out.reshape(lead) if reduction == "none" else out


class FusedLinearDivergenceLoss(nn.Module):
    """:func:`fused_linear_divergence_loss` as a module; keyword options are fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
    **tensors)`` where ``tensors`` are ``student_bias``, ``teacher_bias``, ``teacher_logits`` or
    ``teacher_topk``.
    """

    _TENSORS = ("student_bias", "teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits",
                "teacher_topk", "labels")  # fmt: skip

    def __init__(self, divergence: str = "forward_kl", **options):
        super().__init__()
        check_choice("divergence", divergence, DIVERGENCES)
        allowed = set(fused_linear_divergence_loss.__kwdefaults__) - set(self._TENSORS) - {"divergence"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; expected some of {sorted(allowed)}")
        self.divergence, self.options = divergence, options

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                **tensors):  # fmt: skip
        unknown = set(tensors) - set(self._TENSORS)
        if unknown:
            raise TypeError(f"unknown inputs {sorted(unknown)}; expected some of {list(self._TENSORS)}")
        return fused_linear_divergence_loss(
            student_hidden,
            student_weight,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            labels=labels,
            divergence=self.divergence,
            **tensors,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join([repr(self.divergence)] + [f"{k}={v!r}" for k, v in self.options.items()])


class FusedLinearFYLoss(nn.Module):
    """:func:`fused_linear_fy_loss` as a module: ``forward(hidden, weight, target, bias=None)``."""

    def __init__(self, f: str = "alpha", **options):
        super().__init__()
        allowed = set(fused_linear_fy_loss.__kwdefaults__) - {"bias"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; expected some of {sorted(allowed)}")
        self.f, self.options = f, options

    def forward(self, hidden, weight, target, bias=None):
        return fused_linear_fy_loss(hidden, weight, target, self.f, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.f)] + [f"{k}={v!r}" for k, v in self.options.items()])


# ----------------------------------------------------------------------------- teachers


class _Teacher:
    """The teacher's logits for a chunk of tokens on the shared vocabulary ``[0, vocab)``, or (for the
    top-k bucket) its top-k ids and log-probabilities."""

    def __init__(self, vocab, chunk_logits=None, topk=None, bucket=False):
        self.vocab, self.chunk_logits, self.topk, self.bucket = vocab, chunk_logits, topk, bucket


def _teacher(student, lead, vocab, vocab_mismatch, topk_tail, temperature, keep,
             hidden, weight, bias, softcap, logits, topk, checks) -> _Teacher:  # fmt: skip
    head = hidden if hidden is not None else weight
    sources = (("teacher_hidden/teacher_weight", head), ("teacher_logits", logits), ("teacher_topk", topk))
    given = [name for name, x in sources if x is not None]
    if len(given) != 1:
        raise ValueError(
            "give exactly one teacher: teacher_hidden and teacher_weight (its LM head), teacher_logits, or "
            f"teacher_topk; got {given or 'none'}"
        )
    if (bias is not None or softcap is not None) and given[0] != "teacher_hidden/teacher_weight":
        raise ValueError("teacher_bias and teacher_softcap apply only to a teacher given by its head")

    def shared_vocab(teacher_vocab: int, what: str) -> int:
        if teacher_vocab != vocab and vocab_mismatch == "error":
            raise ValueError(
                f"the teacher's vocabulary ({what}: {teacher_vocab}) differs from the student's "
                f"(student_weight: {vocab}); pass vocab_mismatch='mask' to compare on the shared ids "
                f"[0, {min(vocab, teacher_vocab)})"
            )
        return min(vocab, teacher_vocab)

    if logits is not None:
        check_float("teacher_logits", logits, student.hidden.device)
        if logits.dim() < 1 or logits.shape[:-1] != lead:
            raise ValueError(
                f"teacher_logits {tuple(logits.shape)} must be (..., V_t) with ... = {tuple(lead)}"
            )
        shared = shared_vocab(logits.shape[-1], "teacher_logits")
        rows = logits.detach().reshape(-1, logits.shape[-1])[:, :shared]
        return _Teacher(shared, chunk_logits=lambda r: rows[r])

    if topk is not None:
        indices, logprobs = check_topk(topk, lead, student.hidden.device)
        if topk_tail == "bucket" and temperature != 1:
            raise ValueError(
                f"topk_tail='bucket' needs temperature=1 (got {temperature}): the teacher's tempered "
                "tail mass cannot be known from its top-k"
            )
        flat_idx, flat_lp = topk_teacher.placeholder_for_ignored(indices, logprobs.detach(), keep)
        check_topk_values(flat_idx, flat_lp, vocab, vocab_mismatch, topk_tail, checks)
        # ids beyond the student's vocabulary (allowed by vocab_mismatch="mask") go to a dump column
        flat_idx = topk_teacher.clamp_to_dump(flat_idx, vocab)
        if topk_tail == "bucket":
            return _Teacher(vocab, topk=(flat_idx, flat_lp), bucket=True)
        return _Teacher(vocab, chunk_logits=lambda r: topk_teacher.dense_logits(
            flat_idx[r], flat_lp[r], vocab, student.logits_dtype))  # fmt: skip

    hidden_t, weight_t, bias_t = check_head("teacher", hidden, weight, bias, softcap)
    if hidden.shape[:-1] != lead:
        raise ValueError(
            f"teacher_hidden {tuple(hidden_t.shape)} must have the student's token dimensions {tuple(lead)}"
        )
    if hidden_t.device != student.hidden.device:
        raise ValueError(f"teacher_hidden ({hidden_t.device}) and student_hidden ({student.hidden.device}) "
                         "are on different devices")  # fmt: skip
    shared = shared_vocab(weight_t.shape[0], "teacher_weight")
    head = LMHead(hidden_t.detach(), weight_t.detach()[:shared],
                  None if bias_t is None else bias_t.detach()[:shared], softcap,
                  head_dtype(hidden_t, weight_t))  # fmt: skip
    return _Teacher(shared, chunk_logits=lambda r: head.logits(r)[0])


class _DenseRows:
    """Per-token divergence of a chunk against the teacher's dense logits on the shared vocabulary:
    differentiable in the chunk's logits (``__call__``), or the losses and their gradient at once from
    the row layer (:meth:`loss_and_grad`: one pass over the logits, the gradient written over them)."""

    def __init__(self, teacher: _Teacher, spec: DivergenceRows, labels):
        self.teacher, self.spec, self.labels = teacher, spec, labels

    def _parts(self, z, rows):
        t = self.teacher.chunk_logits(rows).to(z.dtype)
        return t, None if self.labels is None else self.labels[rows]

    def __call__(self, z, rows):
        t, labels = self._parts(z, rows)
        s = z if z.shape[1] == self.teacher.vocab else z[:, : self.teacher.vocab]
        return self.spec.loss(s, t, labels, grad_in_place=self.spec.backend != "reference")

    def loss_and_grad(self, z, rows):
        """(losses, d losses / d z) with z overwritten, or None where z is wider than the teacher's
        vocabulary (vocab_mismatch="mask": the autograd path pads the gradient)."""
        if z.shape[1] != self.teacher.vocab:
            return None
        t, labels = self._parts(z, rows)
        return self.spec.loss_and_grad(z, t, labels)


def _bucket_rows(teacher: _Teacher, spec: DivergenceRows, labels):
    """Per-token divergence between the (k + 1)-outcome distributions (top-k ids, everything else):
    :func:`fdistill._topk_teacher.bucket_outcomes`."""
    indices, logprobs = teacher.topk

    def rows_fn(z, rows):
        acc = accumulate_dtype(z.dtype)
        student, target = topk_teacher.bucket_outcomes(z, indices[rows], logprobs[rows], acc)
        return spec.loss(student, target, None if labels is None else labels[rows])

    return rows_fn


# ----------------------------------------------------------------------------- validation


def _chunk_size(chunk_size, head: LMHead) -> int:
    if chunk_size is None:
        return default_chunk_size(head.vocab, head.hidden.shape[-1], head.hidden.device)
    check_chunk_size(chunk_size)
    return int(chunk_size)


__all__ = [
    "TOPK_TAILS",
    "VOCAB_MISMATCH",
    "FusedLinearDivergenceLoss",
    "FusedLinearFYLoss",
    "fused_linear_divergence_loss",
    "fused_linear_fy_loss",
]
