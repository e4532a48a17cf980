"""Liger-Kernel's distillation losses with Liger's call conventions, computed by fdistill.

Drop-in replacements for ``liger_kernel.transformers.LigerJSD`` / ``LigerKLDIVLoss`` / ``LigerTVDLoss`` /
``LigerFusedLinearJSD`` and ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (and their functional
forms): same arguments in the same order, same values and gradients. What Liger does and fdistill's core
does not, and how this layer bridges it:

* ``LigerJSD`` and ``LigerKLDIVLoss`` take log-probabilities (``LigerTVDLoss`` probabilities) and compute
  their formula pointwise, without renormalising; fdistill takes logits and renormalises. On a row of
  log-probabilities ``x`` (any, normalised or not) with ``a = logsumexp(x)`` and ``b = logsumexp(y)``,
  Liger's pointwise KL is ``sum e^y (y - x) = e^b (KL(softmax y || softmax x) + b - a)``: the KL comes
  from the fused kernel and autograd through ``a`` turns fdistill's softmax gradient into Liger's
  pointwise one (``-e^y``). The generalized JSD with ``0 < beta < 1`` has no such identity: inputs whose
  rows are normalised (``|logsumexp| <= 1e-4``, 4 eps for 16-bit dtypes: ``log_softmax`` outputs) go
  through the fused kernel with the same gradient correction, anything else through the pointwise
  formula in plain PyTorch (not fused; one host sync decides).
* ``reduction="none"`` is elementwise ``(BT, V)`` in Liger (per token in fdistill): computed in plain
  PyTorch (not fused). Liger's ``mean`` divides by ``BT x V``, ``batchmean`` by ``BT`` (fdistill's
  ``mean``).
* ``LigerTVDLoss`` differentiates its first argument with the subgradient ``+-1/2`` (``-1/2`` at ties),
  pointwise in the probabilities: with probabilities in and a pointwise gradient out there is nothing
  for the fused kernel to save, so it is plain PyTorch (one elementwise pass, as Liger's kernel).
* The teacher (second argument, teacher heads) gets no gradient: it is detached silently, as Liger does
  (fdistill's core raises). Mixed student/teacher dtypes are promoted (the core raises).
* ``LigerJSD`` returns the input's dtype; the others float32 (float64 for float64 inputs, where Liger
  returns float32).
* Where Liger divides 0 by 0 (every token ignored; TVD raises ``ZeroDivisionError``) the result is 0.
* Temperature must be > 0 (Liger only rejects 0). ``LigerFusedLinearJSD``'s ``shift_labels`` must be
  token ids in ``[0, V)`` or ``ignore_index`` (Liger only compares them with ``ignore_index``).
* ``-inf`` entries (a masked vocabulary) contribute 0 and get zero gradient, where Liger's pointwise
  formula gives NaN (``0 * (-inf)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..chunked_head import default_chunk_size
from ..fused_linear import fused_linear_divergence_loss, fused_linear_fy_loss
from ..losses import divergence_loss
from ..validation import check_choice, check_int, check_real
from ._common import count_kept, promoted_pair, row_labels, safe_div

__all__ = [
    "LigerFusedLinearJSD",
    "LigerFusedLinearJSDLoss",
    "LigerJSD",
    "LigerKLDIVLoss",
    "LigerTVDLoss",
    "liger_fused_linear_jsd",
    "liger_fused_linear_jsd_loss",
    "liger_jsd",
    "liger_kl_div",
    "liger_tvd",
]

LIGER_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def normalised_tol(dtype: torch.dtype) -> float:
    """|logsumexp| up to which a row of log-probabilities counts as normalised: 1e-4 (float32 / float64
    ``log_softmax`` rows are within 1e-6), 4 eps for 16-bit inputs (their rounding moves the row sum by
    about that; the fused value then differs from Liger's pointwise one by as much as the rounding)."""
    return max(1e-4, 4 * torch.finfo(dtype).eps) if dtype in (torch.bfloat16, torch.float16) else 1e-4


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _lse(x: torch.Tensor, keep=None) -> torch.Tensor:
    """Row logsumexp in float32 at least; ignored rows (which may hold anything) read as zeros."""
    if keep is not None:
        x = torch.where(keep.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.to(_acc(x)).logsumexp(-1)


def _keep(labels, ignore_index):
    return None if labels is None else labels != ignore_index


def _pointwise_kl_rows(x, y, labels, ignore_index, reverse=False):
    """Per-row ``sum_i e^y_i (y_i - x_i)`` (``reverse``: ``sum_i e^x_i (x_i - y_i)``), Liger's pointwise KL,
    differentiable in ``x``, exact for any rows: ``e^b (KL(softmax y || softmax x) + b - a)`` with
    ``a, b`` the rows' logsumexp (``e^a (KL(softmax x || softmax y) + a - b)`` reversed)."""
    keep = _keep(labels, ignore_index)
    a, b = _lse(x, keep), _lse(y, keep)
    weight_side = a if reverse else b
    live = ~torch.isneginf(weight_side)  # a side with no mass: the row is 0
    live = live if keep is None else live & keep
    kl_labels = torch.where(live, 0, -1)  # dead and ignored rows are skipped by the kernel
    kl = divergence_loss(x, y, "reverse_kl" if reverse else "forward_kl", labels=kl_labels, ignore_index=-1,
                         reduction="none")  # fmt: skip
    rows = a.exp() * (kl + a - b) if reverse else b.exp() * (kl + b - a)
    return torch.where(live, rows, torch.zeros_like(rows))


def _jsd_pointwise(x, y, beta):
    """Liger's elementwise JSD terms ``beta P Y + (1 - beta) Q X - M log M``, ``P = e^Y``, ``Q = e^X``,
    ``M = beta P + (1 - beta) Q`` (in float32 at least; 0 where the probability is 0)."""
    x, y = x.to(_acc(x)), y.to(_acc(y))
    p, q = y.exp(), x.exp()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    py = torch.where(p > 0, p * torch.where(p > 0, y, zero), zero)
    qx = torch.where(q > 0, q * torch.where(q > 0, x, zero), zero)
    m = beta * p + (1 - beta) * q
    return beta * py + (1 - beta) * qx - torch.special.xlogy(m, m)


def _jsd_rows(x, y, beta, labels, ignore_index):
    keep = _keep(labels, ignore_index)
    a, b = _lse(x, keep), _lse(y, keep)
    tol = normalised_tol(x.dtype)
    normalised = (a.abs() <= tol) & (b.abs() <= tol)
    if keep is not None:
        normalised = normalised | ~keep
    if not bool(normalised.all()):  # unnormalised inputs: Liger's pointwise formula, not fused
        if keep is None:
            return _jsd_pointwise(x, y, beta).sum(-1)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)  # ignored rows may hold anything (NaN)
        x, y = (torch.where(keep.unsqueeze(-1), v, zero) for v in (x, y))
        rows = _jsd_pointwise(x, y, beta).sum(-1)
        return torch.where(keep, rows, torch.zeros_like(rows))
    opts = dict(labels=labels, ignore_index=ignore_index, reduction="none")
    rows = divergence_loss(x, y, "jsd", beta=beta, **opts)
    # fdistill's gradient is Liger's pointwise one g minus softmax(x) * sum(g); sum(g) is
    # (1 - beta) KL(q || m) with m = beta p + (1 - beta) q: added back through logsumexp(x)
    with torch.no_grad():
        s = (1 - beta) * divergence_loss(x.detach(), y, "skew_reverse_kl", skew=1 - beta, **opts)
    rows = rows + s * (a - a.detach())
    return rows if keep is None else torch.where(keep, rows, torch.zeros_like(rows))


def liger_jsd(input, target, shift_labels=None, beta: float = 0.5, ignore_index: int = -100):
    """``liger_kernel.transformers.functional.liger_jsd``: the generalized JSD of log-probabilities.

    ``input`` = log q (student, ``(BT, V)``), ``target`` = log p (teacher, no gradient);
    ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q`` (beta = 0: KL(p || q), 1:
    KL(q || p)) summed over the vocabulary, pointwise, divided by the tokens whose ``shift_labels`` is not
    ``ignore_index`` (all ``BT`` without labels). Returns the input's dtype.
    """
    x, y = promoted_pair("input", input, "target", target, two_d=True)
    y = y.detach()
    beta = check_real("beta", beta, 0.0, 1.0)
    labels = row_labels("shift_labels", shift_labels, x.shape[0], x.device, ignore_index)
    if beta == 0.0:
        rows = _pointwise_kl_rows(x, y, labels, ignore_index)
    elif beta == 1.0:
        rows = _pointwise_kl_rows(x, y, labels, ignore_index, reverse=True)
    else:
        rows = _jsd_rows(x, y, beta, labels, ignore_index)
    return safe_div(rows.sum(), count_kept(labels, ignore_index, x.shape[0])).to(input.dtype)


class LigerJSD(nn.Module):
    """``liger_kernel.transformers.LigerJSD(beta, ignore_index)``:
    ``forward(log_q, log_p, shift_labels=None)`` (see :func:`liger_jsd`)."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.beta = check_real("beta", beta, 0.0, 1.0)
        self.ignore_index = ignore_index

    def forward(self, log_q, log_p, shift_labels=None):
        return liger_jsd(log_q, log_p, shift_labels, self.beta, self.ignore_index)


def liger_kl_div(input, target, size_average: bool = True, reduce: bool = True, reduction: str = "mean",
                 log_target: bool = False, eps: float = 1e-10):  # fmt: skip
    """``liger_kernel.transformers.functional.liger_kl_div`` (``torch.nn.functional.kl_div``'s convention).

    ``input`` = student log-probabilities ``(BT, V)``, ``target`` = teacher probabilities (log-probabilities
    with ``log_target``; no gradient). Pointwise ``target (log target - input)``; ``reduction``: ``none``
    (elementwise ``(BT, V)``, plain PyTorch), ``sum``, ``mean`` (``/ (BT V)``), ``batchmean`` (``/ BT``).
    ``size_average`` / ``reduce`` are ignored, as in Liger. ``eps`` clamps ``target`` inside the log of the
    ``none`` reduction as Liger does; the reduced forms use the exact log (the difference is below
    ``eps`` per entry).
    """
    x, t = promoted_pair("input", input, "target", target, two_d=True)
    t = t.detach()
    check_choice("reduction", reduction, LIGER_REDUCTIONS)
    check_real("eps", eps, 0.0)
    if reduction == "none":  # elementwise: not fused
        x, t = x.to(_acc(x)), t.to(_acc(t))
        return t.exp() * (t - x) if log_target else t * (t.clamp_min(eps).log() - x)
    y = t if log_target else t.log()
    total = _pointwise_kl_rows(x, y, None, -100).sum()
    if reduction == "sum":
        return total
    return total / (x.shape[0] * (x.shape[1] if reduction == "mean" else 1))


class LigerKLDIVLoss(nn.KLDivLoss):
    """``liger_kernel.transformers.LigerKLDIVLoss(eps=1e-10, *args, **kwargs)`` (``nn.KLDivLoss``'s
    arguments: ``reduction="mean"`` by default, ``log_target``): ``forward(y_pred, y_true)``, see
    :func:`liger_kl_div`."""

    def __init__(self, eps: float = 1e-10, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, y_pred, y_true):
        return liger_kl_div(y_pred, y_true, reduction=self.reduction, log_target=self.log_target,
                            eps=self.eps)  # fmt: skip


def liger_tvd(input, target, shift_labels=None, reduction: str = "mean", ignore_index: int = -100):
    """``liger_kernel.transformers.functional.liger_tvd``: total variation ``1/2 sum |p - q|`` of
    probabilities ``input`` = p (differentiated, ``(BT, V)``) and ``target`` = q (no gradient).

    ``reduction``: ``none`` (elementwise ``(BT, V)``), ``sum``, ``mean`` (``/ (n V)``), ``batchmean``
    (``/ n``), n = the tokens whose ``shift_labels`` is not ``ignore_index`` (``BT`` without labels).
    Gradient ``+1/2`` where ``p > q``, else ``-1/2`` (Liger's subgradient; ignored tokens 0). Plain
    PyTorch (see the module's docstring).
    """
    p, q = promoted_pair("input", input, "target", target, two_d=True)
    q = q.detach()
    check_choice("reduction", reduction, LIGER_REDUCTIONS)
    labels = row_labels("shift_labels", shift_labels, p.shape[0], p.device, ignore_index)
    p, q = p.to(_acc(p)), q.to(_acc(q))
    diff = p - q
    sign = torch.where(diff > 0, 1.0, -1.0).to(diff.dtype)  # value 1/2 |p - q|, gradient 1/2 sign
    elem = 0.5 * diff * sign
    if labels is not None:
        elem = torch.where((labels != ignore_index).unsqueeze(-1), elem, torch.zeros_like(elem))
    if reduction == "none":
        return elem
    total = elem.sum()
    if reduction == "sum":
        return total
    n = count_kept(labels, ignore_index, p.shape[0])
    return safe_div(total, n * (p.shape[1] if reduction == "mean" else 1))


class LigerTVDLoss(nn.Module):
    """``liger_kernel.transformers.LigerTVDLoss(reduction="batchmean", ignore_index=-100)``:
    ``forward(p, q, shift_labels=None)``, see :func:`liger_tvd`."""

    def __init__(self, reduction: str = "batchmean", ignore_index: int = -100):
        super().__init__()
        self.reduction = check_choice("reduction", reduction, LIGER_REDUCTIONS)
        self.ignore_index = ignore_index

    def forward(self, p, q, shift_labels=None):
        return liger_tvd(p, q, shift_labels, self.reduction, self.ignore_index)


def _check_temperature(temperature) -> float:
    temperature = check_real("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (Liger only rejects 0), got {temperature}")
    return temperature


def liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels=None,
                           jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                           accum_dtype=None):  # fmt: skip
    """``liger_kernel.transformers.functional.liger_fused_linear_jsd``: the generalized JSD (``jsd_beta``)
    of ``softmax(student_input @ student_weight.T / T)`` and the teacher's, both heads divided by the
    temperature, averaged over the tokens whose ``shift_labels`` is not ``ignore_index`` (all without
    labels); no ``T^2`` factor. :func:`fdistill.fused_linear_divergence_loss` with ``divergence="jsd"``.
    ``accum_dtype`` is accepted and ignored (fdistill accumulates in its own dtype). Returns float32.
    """
    if accum_dtype is not None and not isinstance(accum_dtype, torch.dtype):
        raise TypeError(f"accum_dtype must be None or a torch.dtype, got {type(accum_dtype).__name__}")
    check_real("jsd_beta", jsd_beta, 0.0, 1.0)
    _check_temperature(temperature)
    return fused_linear_divergence_loss(
        student_input, student_weight, teacher_hidden=teacher_input, teacher_weight=teacher_weight,
        divergence="jsd", beta=jsd_beta, temperature=temperature, labels=shift_labels,
        ignore_index=ignore_index, reduction="mean",
    )  # fmt: skip


class LigerFusedLinearJSD(nn.Module):
    """``liger_kernel.transformers.LigerFusedLinearJSD(jsd_beta, ignore_index, temperature, accum_dtype)``:
    ``forward(student_input, student_weight, teacher_input, teacher_weight, shift_labels)``, see
    :func:`liger_fused_linear_jsd`."""

    def __init__(self, jsd_beta=0.5, ignore_index=-100, temperature=1.0, accum_dtype=None):
        super().__init__()
        self.jsd_beta = check_real("jsd_beta", jsd_beta, 0.0, 1.0)
        self.temperature = _check_temperature(temperature)
        self.ignore_index = ignore_index
        self.accum_dtype = accum_dtype

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels=None):
        return liger_fused_linear_jsd(
            student_input, student_weight, teacher_input, teacher_weight, shift_labels, self.jsd_beta,
            self.ignore_index, self.temperature, self.accum_dtype,
        )  # fmt: skip


def liger_fused_linear_jsd_loss(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                                student_bias=None, teacher_bias=None, weight_hard_loss: float = 0.5,
                                weight_soft_loss: float = 0.5, beta: float = 0.5, ignore_index: int = -100,
                                temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                                return_soft_hard_loss: bool = False):  # fmt: skip
    """``liger_kernel.chunked_loss.functional.liger_fused_linear_jsd`` (``LigerFusedLinearJSDLoss``):
    ``weight_hard_loss * CE + weight_soft_loss * JSD``.

    CE: the cross-entropy of the student's logits (with ``student_bias``, temperature 1) on ``true_labels``;
    JSD: the generalized JSD (``beta``) of both heads' logits divided by ``temperature``; each summed over
    the tokens whose label is not ``ignore_index`` and divided by their count. A teacher vocabulary larger
    than the student's pads the student's logits with zeros for the JSD (as Liger; here as zero rows of a
    copy of the student's weight). ``return_soft_hard_loss``: ``(loss, jsd, ce)``. ``compiled`` is
    ignored; ``chunk_size`` bounds the tokens per chunk (fdistill's default is used when smaller: Liger's
    1024 tokens x V logits would be 512 MiB at V = 128k). Returns float32.

    One fused pass (``fused_linear_divergence_loss`` with ``hard_loss_weight = w_hard / w_soft``, times
    ``w_soft``), or two (the JSD and the CE as ``fused_linear_fy_loss(f="kl")``) when the parts are
    returned, the vocabularies differ or ``weight_soft_loss`` is 0.
    """
    w_hard = check_real("weight_hard_loss", weight_hard_loss, 0.0)
    w_soft = check_real("weight_soft_loss", weight_soft_loss, 0.0)
    check_real("beta", beta, 0.0, 1.0)
    _check_temperature(temperature)
    if true_labels is None:
        raise TypeError("true_labels is required (the cross-entropy targets and the ignore mask)")
    for name, w in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"{name} must be a (V, H) tensor")
    if check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab, teacher_vocab = student_weight.shape[0], teacher_weight.shape[0]
    hidden = max(student_weight.shape[1], teacher_weight.shape[1])
    chunk_size = min(int(chunk_size), default_chunk_size(teacher_vocab, hidden, student_weight.device))
    if teacher_vocab < vocab:
        raise ValueError(
            f"teacher_weight's vocabulary ({teacher_vocab}) must be at least student_weight's ({vocab}): "
            "Liger pads the student's logits, never the teacher's"
        )
    teacher = dict(teacher_hidden=teacher_input, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    common = dict(labels=true_labels, ignore_index=ignore_index, chunk_size=chunk_size)
    soft_opts = dict(divergence="jsd", beta=beta, temperature=temperature, **teacher, **common)
    if not return_soft_hard_loss and teacher_vocab == vocab and w_soft > 0:
        combined = fused_linear_divergence_loss(
            student_input, student_weight, student_bias=student_bias, hard_loss_weight=w_hard / w_soft,
            **soft_opts,
        )  # fmt: skip
        return w_soft * combined
    # the cross-entropy is the Fenchel-Young loss of KL with a uniform reference
    hard = fused_linear_fy_loss(
        student_input, student_weight, true_labels, "kl", bias=student_bias, reference="uniform",
        ignore_index=ignore_index, chunk_size=chunk_size,
    )  # fmt: skip
    if not return_soft_hard_loss and w_soft == 0:
        return w_hard * hard
    weight, bias = student_weight, student_bias
    if teacher_vocab > vocab:  # zero logits for the teacher's extra ids: zero rows (and zero bias)
        pad = teacher_vocab - vocab
        weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
        bias = None if bias is None else torch.cat([bias, bias.new_zeros(pad)])
    soft = fused_linear_divergence_loss(student_input, weight, student_bias=bias, **soft_opts)
    loss = w_hard * hard + w_soft * soft
    return (loss, soft, hard) if return_soft_hard_loss else loss


class LigerFusedLinearJSDLoss(nn.Module):
    """``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss, weight_soft_loss, beta,
    ignore_index, temperature, compiled, chunk_size, return_soft_hard_loss)``: ``forward(student_input,
    student_weight, teacher_input, teacher_weight, true_labels, student_bias=None, teacher_bias=None)``,
    see :func:`liger_fused_linear_jsd_loss`."""

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: int = 1024, return_soft_hard_loss: bool = False):  # fmt: skip
        super().__init__()
        self.weight_hard_loss = check_real("weight_hard_loss", weight_hard_loss, 0.0)
        self.weight_soft_loss = check_real("weight_soft_loss", weight_soft_loss, 0.0)
        self.beta = check_real("beta", beta, 0.0, 1.0)
        self.ignore_index = ignore_index
        self.temperature = _check_temperature(temperature)
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels,
                student_bias=None, teacher_bias=None):  # fmt: skip
        return liger_fused_linear_jsd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
            teacher_bias, self.weight_hard_loss, self.weight_soft_loss, self.beta, self.ignore_index,
            self.temperature, self.compiled, self.chunk_size, self.return_soft_hard_loss,
        )  # fmt: skip
