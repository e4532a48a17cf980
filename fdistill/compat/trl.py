"""TRL's ``GKDTrainer.generalized_jsd_loss`` with TRL's call conventions, computed by fdistill.

``generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
reduction="batchmean", num_items_in_batch=None)`` as TRL 1.16 defines it. Both logits are divided by the
temperature (no ``T^2`` factor); ``beta`` as fdistill's ``jsd`` (0: KL(p || q), 1: KL(q || p)); tokens
whose label is -100 are dropped. TRL's reductions act on the *elementwise* ``(tokens, V)`` terms:

========================= ======================================================================
``num_items_in_batch``    sum / num_items_in_batch (whatever ``reduction`` says)
``batchmean``             sum / (tokens not ignored) with labels, sum / ``student_logits.size(0)``
                          (the batch size B, not B x T) without
``sum``                   sum
``mean``                  sum / (tokens x V): the kept tokens with labels, all without
``none``                  the elementwise terms: ``(B, T, V)``, or ``(kept tokens, V)`` with labels
========================= ======================================================================

Every reduction but ``none`` runs on the fused kernel (per-token rows, summed here); ``none`` needs the
elementwise terms, which the kernel does not produce: plain PyTorch (not fused). Differences from TRL:
the result is cast to the inputs' (promoted) dtype as TRL's is, but computed in float32 (TRL computes
in the input dtype); where TRL divides 0 by 0 (``mean`` with every token ignored) the result is 0; a
reduction other than the five above raises (TRL returns the elementwise terms); temperature must be
> 0. A teacher that requires grad is differentiated, as in TRL (through fdistill's ``reference``
backend: not fused).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..losses import divergence_loss
from ..validation import check_choice, check_real
from ._common import promoted_pair, row_labels, safe_div

__all__ = ["TRL_REDUCTIONS", "generalized_jsd_loss"]

TRL_REDUCTIONS = ("batchmean", "sum", "mean", "none")
_IGNORE = -100  # TRL's fixed ignore label


def _elementwise_jsd(s, t, beta, temperature):
    """TRL's elementwise terms in float32 at least: ``beta p log(p/m) + (1 - beta) q log(q/m)``."""
    acc = torch.promote_types(s.dtype, torch.float32)
    log_q = F.log_softmax(s.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(t.to(acc) / temperature, dim=-1)
    if beta == 0:
        return log_p.exp() * (log_p - log_q)
    if beta == 1:
        return log_q.exp() * (log_q - log_p)
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=acc)),
                            log_q + torch.log1p(torch.tensor(-beta, dtype=acc)))  # fmt: skip
    return beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch=None):  # fmt: skip
    """``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (see the module's docstring)."""
    s, t = promoted_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    beta = check_real("beta", beta, 0.0, 1.0)
    temperature = check_real("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_choice("reduction", reduction, TRL_REDUCTIONS)
    vocab = s.shape[-1]
    flat = row_labels("labels", labels, s[..., 0].numel(), s.device, _IGNORE)
    grad_teacher = t.requires_grad
    if reduction == "none" and num_items_in_batch is None:  # elementwise: not fused
        elem = _elementwise_jsd(s, t, beta, temperature)
        if flat is not None:
            elem = elem.reshape(-1, vocab)[flat != _IGNORE]
        return elem.to(s.dtype)
    rows = divergence_loss(s, t, "jsd", beta=beta, temperature=temperature,
                           labels=None if flat is None else flat.reshape(s.shape[:-1]),
                           ignore_index=_IGNORE, reduction="none", grad_teacher=grad_teacher)  # fmt: skip
    total = rows.sum()
    kept = None if flat is None else (flat != _IGNORE).sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        out = total / num_items_in_batch
    elif reduction == "batchmean":
        out = safe_div(total, kept if kept is not None else s.shape[0])
    elif reduction == "sum":
        out = total
    else:  # "mean": over the elementwise terms
        out = safe_div(total, (kept if kept is not None else s[..., 0].numel()) * vocab)
    return out.to(s.dtype)
