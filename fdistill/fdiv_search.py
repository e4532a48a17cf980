"""The tau search of the f-divergence operators on tensors of rows: the C++ ``TauSearch`` and sweep point of
csrc/include/fdistill/fdiv_math.h, for the vocabulary-parallel path, whose sweeps are sums over shards
merged by an all-reduce (docs/divergences.md, "The f-divergence operators").

p*_j = q_j (f*)'(x_j - tau), x = theta - max theta, with tau such that S0(tau) = sum_j p*_j = 1. The
search variable t is the one the kernels store in their statistics ``[max theta, t, S0]``:

* ``"shift"`` (alpha = 1.5 and 2) and ``"kl"``: t = tau, evaluated at v = x - t;
* ``"pole"`` (reverse_kl, js): t = sigma = tau + pole, the argmax's distance to the pole of (f*)'
  (1 for reverse_kl, log 2 for js); (f*)' is written in d = t - x;
* ``"log_scale"`` (every other alpha): t = r = log s, s = 1 - (alpha - 1) tau; an entry's
  (f*)' = exp(m + log1p(k x) / (alpha - 1)) with k = (alpha - 1) e^-r, m = r / (alpha - 1), and the
  sweep's slope S1' = s S1.

Safeguarded Newton on S0^c - 1 from the bracket end where S0 >= 1 (the same iterates in every
variable; the end is Jensen's bound where (f*)' is convex), bisection where a step leaves the bracket;
the answer is the evaluated point whose S0 is nearest 1, and p is renormalised by that S0.
"""

from __future__ import annotations

import math

import torch

KINDS = ("kl", "shift", "pole", "log_scale")
# The alpha values with closed forms of their own (the kernels' Alpha15 / Alpha2 kinds): searched in tau
CLOSED_FORM_ALPHAS = (1.5, 2.0)
_SUMS = torch.float64


def search_kind(family: str, alpha: float) -> str:
    """Which search variable the kernels use for (family, alpha) (module docstring)."""
    if family == "kl":
        return "kl"
    if family in ("reverse_kl", "js"):
        return "pole"
    return "shift" if alpha in CLOSED_FORM_ALPHAS else "log_scale"


def bracket_end(family: str, alpha: float, q: torch.Tensor) -> torch.Tensor:
    """tau = -f'(1 / q) as the search variable t (C++ ``shifted_tau_bound``), float64: q for reverse_kl,
    log1p(q) for js, -(alpha - 1) log q for the log-scale alpha, (1 - q^(1 - alpha)) / (alpha - 1) for
    alpha = 1.5 and 2."""
    q = q.to(_SUMS)
    kind = search_kind(family, alpha)
    if family == "reverse_kl":
        return q
    if family == "js":
        return torch.log1p(q)
    if kind == "log_scale":
        return -(alpha - 1) * torch.log(q)
    return -torch.expm1(-(alpha - 1) * torch.log(q)) / (alpha - 1)


def newton_power(family: str, alpha: float) -> float:
    """c of phi = S0^c - 1: -1 for reverse KL, 1 for JS, alpha - 1 otherwise (C++ ``newton_power``)."""
    if family == "reverse_kl":
        return -1.0
    if family == "js":
        return 1.0
    return alpha - 1.0


class TauSearch:
    """The search of a batch of rows (float64 tensors; C++ ``TauSearch`` and ``tau_step``).

    ``q_max``: q at the argmax, ``q_total``: the live q mass, ``x_mean``: its q-weighted mean of
    theta - max theta. ``t`` is the next point to evaluate; :meth:`step` takes the sums S0 and S1 there
    (merged over the shards) and marks settled rows ``done``; ``best_t`` / ``best_s0`` are the answer."""

    def __init__(self, family: str, alpha: float, q_max, q_total, x_mean, eps: float, done: torch.Tensor):
        self.kind = search_kind(family, alpha)
        self.c = newton_power(family, alpha)
        self.eps = eps
        self.lo = bracket_end(family, alpha, q_max)  # S0(lo) >= 1
        self.hi = bracket_end(family, alpha, q_total)  # S0(hi) <= 1
        self.lo0 = self.lo  # tau_lo: lo again if Jensen's start turns out above the root
        if family in ("reverse_kl", "js") or alpha <= 2:  # (f*)' convex: Jensen's start (start_tau_search)
            x_mean = x_mean.to(_SUMS)
            if self.kind == "log_scale":
                t_j = torch.log(torch.exp(self.hi) - (alpha - 1) * x_mean)
            else:
                t_j = self.hi + x_mean
            self.lo = torch.where((t_j - self.lo) * (t_j - self.hi) < 0, t_j, self.lo)
        self.t = self.lo.clone()
        self.best_t = self.lo.clone()
        self.best_s0 = torch.full_like(self.lo, math.nan)  # none yet
        self.done = done.clone()

    def step(self, s0: torch.Tensor, s1: torch.Tensor, tol: float) -> None:
        s0, s1 = s0.to(_SUMS), s1.to(_SUMS)
        live = ~self.done
        better = live & (self.best_s0.isnan() | ((s0 - 1).abs() <= (self.best_s0 - 1).abs()))
        self.best_t = torch.where(better, self.t, self.best_t)
        self.best_s0 = torch.where(better, s0, self.best_s0)
        hit = (s0 - 1).abs() <= tol
        above = s0 > 1
        restart = live & ~above & (self.t == self.lo)  # Jensen's start was above the root: from tau_lo again
        self.lo = torch.where(live & above, self.t, torch.where(restart, self.lo0, self.lo))
        self.hi = torch.where(live & ~above, self.t, self.hi)
        # phi / phi' with phi = S0^c - 1: its numerator as -S0 expm1(-c log S0) (no cancellation near c = 0)
        num = s0 * torch.expm1(-self.c * torch.log(s0))
        if self.kind == "log_scale":  # s_next = s (1 + num / S1'), S1' = s S1
            nxt = self.t + torch.log1p(num / s1)
            resolution = self.t.abs() + abs(self.c)
        else:
            nxt = self.t - num / (self.c * s1)
            resolution = self.t.abs() if self.kind == "pole" else 1 + self.t.abs()
        inside = (nxt - self.lo) * (nxt - self.hi) < 0  # either orientation (r's is reversed for alpha > 1)
        tiny = inside & ((nxt - self.t).abs() <= self.eps * resolution)
        nxt = torch.where(inside, nxt, (self.lo + self.hi) / 2)  # bisection; also catches NaN
        settled = hit | tiny | (nxt == self.lo) | (nxt == self.hi)
        self.t = torch.where(live & ~settled, nxt, self.t)
        self.done = self.done | settled


def sweep_terms(x: torch.Tensor, t: torch.Tensor, family: str, alpha: float):
    """(f*)'(x - tau) and the slope term ((f*)'', or (f*)' / (1 + w) for the log-scale alpha) of entries
    x = theta - max theta (-inf: masked, 0) at the rows' search variable t ([rows], float64; rounded to
    x's dtype first, as the kernels' statistics hold it): the PyTorch twin of ``conj_grads_at``."""
    acc = x.dtype
    t_acc = t.to(acc)
    kind = search_kind(family, alpha)
    zero = torch.zeros((), dtype=acc, device=x.device)
    if kind == "log_scale":
        r = t_acc.to(_SUMS)
        lim = torch.finfo(acc).max
        k = ((alpha - 1) * torch.exp(-r)).clamp(-lim, lim).to(acc).unsqueeze(-1)
        m = (r / (alpha - 1)).to(acc).unsqueeze(-1)
        w = k * x
        inside = w > -1
        d1 = torch.where(inside, torch.exp(m + torch.log1p(w) / (alpha - 1)), zero)
        return d1, torch.where(inside, d1 / (1 + w), zero)
    v = x - t_acc.unsqueeze(-1)
    if kind == "kl":
        d1 = torch.exp(v)
        return d1, d1
    if family == "reverse_kl":  # 1 / d, d = sigma - x
        d1 = 1 / -v
        return d1, d1 * d1
    if family == "js":  # 1 / expm1(d)
        d1 = 1 / torch.expm1(-v)
        return d1, d1 * (1 + d1)
    if alpha == 2.0:
        base = 1 + v
        return base.clamp_min(0), (base > 0).to(acc)
    base = (1 + 0.5 * v).clamp_min(0)  # alpha = 3/2
    return base * base, base
