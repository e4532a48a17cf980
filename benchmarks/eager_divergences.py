"""Every fdistill divergence as the eager PyTorch a user would write: the baselines of the benchmarks.

float32 ``log_softmax`` of both logits (as TRL's ``generalized_jsd_loss``), ``F.kl_div`` on log
targets, ``logaddexp`` for the mixtures (no stacked copy), averaged over tokens; parameters are
fdistill's defaults (beta = 0.5, skew = 0.1, alpha = 0.5), so each computes the same loss as
``fdistill.divergence_loss(s, t, divergence)``. No masking of ``-inf`` logits or empty rows: the
benchmarks' logits are finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BETA, SKEW, ALPHA = 0.5, 0.1, 0.5  # fdistill.divergence_loss's defaults


def _log_probs(s, t):
    return F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)


def _kl(log_a, log_b):
    """KL(a || b) averaged over rows, from log-probabilities."""
    return F.kl_div(log_b, log_a, reduction="batchmean", log_target=True)


def forward_kl(s, t):
    ls, lt = _log_probs(s, t)
    return _kl(lt, ls)


def reverse_kl(s, t):
    ls, lt = _log_probs(s, t)
    return _kl(ls, lt)


def jeffreys(s, t, beta=BETA):
    ls, lt = _log_probs(s, t)
    return (1 - beta) * _kl(lt, ls) + beta * _kl(ls, lt)


def jsd(s, t, beta=BETA):
    ls, lt = _log_probs(s, t)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
    return beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)


def skew_kl(s, t, skew=SKEW):
    ls, lt = _log_probs(s, t)
    return _kl(lt, torch.logaddexp(lt + math.log(skew), ls + math.log(1 - skew)))


def skew_reverse_kl(s, t, skew=SKEW):
    ls, lt = _log_probs(s, t)
    return _kl(ls, torch.logaddexp(ls + math.log(skew), lt + math.log(1 - skew)))


def tv(s, t):
    return 0.5 * (F.softmax(t.float(), -1) - F.softmax(s.float(), -1)).abs().sum(-1).mean()


def alpha(s, t, a=ALPHA):
    ls, lt = _log_probs(s, t)
    log_a = torch.logsumexp(a * lt + (1 - a) * ls, -1)  # log sum p^a q^(1-a)
    return (-torch.expm1(log_a)).mean() / (a * (1 - a))


EAGER = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jeffreys": jeffreys,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tv": tv,
    "alpha": alpha,
}
