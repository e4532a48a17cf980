"""Pure-PyTorch f-softargmax, f-softmax and Fenchel–Young losses (Roulet et al. 2025).

The semantics every f-divergence kernel is tested against (run it in float64 for ground truth).
For a convex generator ``f`` with ``f(1) = 0`` and a positive reference measure ``q``:

* ``D_f(p, q) = sum_j q_j f(p_j / q_j)``;
* f-softargmax ``p*_j = q_j (f*)'(theta_j - tau)``, ``tau`` such that ``sum_j p*_j = 1``, found by
  bisection on the bracket of docs/divergences.md#tau-bracket;
* f-softmax ``softmax_f(theta) = <p*, theta> - D_f(p*, q)``;
* Fenchel–Young loss ``L(theta; y) = <p* - y, theta> - D_f(p*, q) + D_f(y, q)``, gradient ``p* - y``
  (``D_f(y, q)`` dropped for reverse KL).

``-inf`` logits are masked: outside the simplex, and left out of every sum.

Generators (``u = p / q``, ``v = theta - tau``):

======== ================================ ================================= ===================
f        f(u)                             (f*)'(v)                          domain of (f*)'
======== ================================ ================================= ===================
kl       u log u - u + 1                  exp(v)                            all v
reverse  u - 1 - log u                    1 / (1 - v)                       v < 1
alpha    (u^a - 1 - a (u - 1))/(a (a-1))  [1 + (a - 1) v]_+^(1/(a-1))       all v (a > 1), else
                                                                            v < 1/(1 - a)
js       u log u - (u+1) log((u+1)/2)     exp(v) / (2 - exp(v))             v < log 2
======== ================================ ================================= ===================

``hellinger`` is alpha = 1/2 and ``chi2`` alpha = 2.
"""

from __future__ import annotations

import math

import torch

F_NAMES = ("kl", "reverse_kl", "alpha", "js", "hellinger", "chi2")


def canonical_f(f: str, alpha: float) -> tuple[str, float]:
    """(family, alpha): hellinger and chi2 are alpha = 1/2 and 2."""
    if f == "hellinger":
        return "alpha", 0.5
    if f == "chi2":
        return "alpha", 2.0
    return f, alpha


def f_value(family: str, alpha: float, u: torch.Tensor) -> torch.Tensor:
    """f(u) for u >= 0 (f(0) may be +inf)."""
    if family == "kl":
        return torch.special.xlogy(u, u) - u + 1
    if family == "reverse_kl":
        return u - 1 - torch.log(u)
    if family == "alpha":  # u^a - 1 - a (u - 1) = u expm1((a - 1) log u) - (a - 1)(u - 1): exact near a = 1
        live = u > 0
        safe = torch.where(live, u, torch.ones_like(u))  # no 0 * inf in the backward at u = 0
        grow = torch.where(live, safe * torch.expm1((alpha - 1) * torch.log(safe)), torch.zeros_like(u))
        return (grow / (alpha - 1) - (u - 1)) / alpha
    if family == "js":
        return torch.special.xlogy(u, u) - torch.special.xlogy(u + 1, (u + 1) / 2)
    raise ValueError(f"unknown f {family!r}")


def f_prime(family: str, alpha: float, u: float) -> float:
    """f'(u) for u > 0 (a Python float: the bracket)."""
    if family == "kl":
        return math.log(u)
    if family == "reverse_kl":
        return 1 - 1 / u
    if family == "alpha":
        return math.expm1((alpha - 1) * math.log(u)) / (alpha - 1)
    if family == "js":
        return math.log(2 * u / (u + 1))
    raise ValueError(f"unknown f {family!r}")


def conj_grad(family: str, alpha: float, v: torch.Tensor) -> torch.Tensor:
    """(f*)'(v) on its domain (the bracket keeps every evaluation inside it)."""
    if family == "kl":
        return torch.exp(v)
    if family == "reverse_kl":
        return 1 / (1 - v)
    if family == "alpha":  # x^(1/(a-1)), x = 1 + w, w = (a - 1) v, as exp(log1p(w) / (a - 1)): exact at a ~ 1
        w = (alpha - 1) * v
        return torch.where(w > -1, torch.exp(torch.log1p(w.clamp(min=-1)) / (alpha - 1)), torch.zeros_like(w))
    if family == "js":
        e = torch.exp(v)
        return e / (2 - e)
    raise ValueError(f"unknown f {family!r}")


def jacobian_weights(family: str, alpha: float, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """w = q (f*)''(theta - tau) = q / f''(p / q), written in p and q; 0 off the support."""
    if family == "kl":
        w = p
    elif family == "reverse_kl":
        w = p * (p / q)  # (p^2 would underflow first)
    elif family == "alpha":  # p^(2 - alpha) of a safe base: no inf * 0 = NaN in a second derivative at p = 0
        w = torch.where(p > 0, p, torch.ones_like(p)).pow(2 - alpha) * q.pow(alpha - 1)
    elif family == "js":
        w = p * (1 + p / q)
    else:
        raise ValueError(f"unknown f {family!r}")
    return torch.where(p > 0, w, torch.zeros_like(w))


def reference_measure(reference, logits: torch.Tensor) -> torch.Tensor:
    """q broadcast to the logits' shape: 'uniform' (1/V), 'unit' (1) or a positive tensor."""
    if isinstance(reference, str):
        vocab = logits.shape[-1]
        value = 1.0 / vocab if reference == "uniform" else 1.0
        return torch.full_like(logits, value)
    return reference.to(logits.dtype).expand_as(logits)


def f_softargmax_reference(logits, f="alpha", *, alpha=1.5, reference="uniform", n_iter=80):
    """p* by bisection over the last dimension (``n_iter`` halvings, then p /= sum p).

    ``-inf`` logits are masked (p = 0, outside the simplex); an all ``-inf`` row gives p = 0; a row
    with a NaN or ``+inf`` logit gives NaN. Differentiable: the gradient is the exact vector-Jacobian
    product of implicit differentiation (the bisection's iterates are not differentiated), and its
    own derivative the second derivative on the support.
    """
    family, alpha = canonical_f(f, alpha)
    q = reference_measure(reference, logits)
    return _SoftargmaxReference.apply(logits, q, family, alpha, n_iter)


def _bisect_softargmax(logits, q, family, alpha, n_iter):
    live = logits > -math.inf
    empty = ~live.any(-1, keepdim=True)
    top = logits.amax(-1, keepdim=True)
    theta = logits - torch.where(empty, torch.zeros_like(top), top)  # max at 0
    q_star = torch.gather(q, -1, theta.argmax(-1, keepdim=True))  # q at the argmax
    q_total = torch.where(live, q, torch.zeros_like(q)).sum(-1, keepdim=True)
    q_total = torch.where(empty, torch.ones_like(q_total), q_total)
    search = _Search(family, alpha, theta, q)
    ge, le = search.bracket(q_star, q_total)  # S0 >= 1 at ge, S0 <= 1 at le
    for _ in range(n_iter):
        mid = (ge + le) / 2
        above = search.total(mid) >= 1
        ge = torch.where(above, mid, ge)
        le = torch.where(above, le, mid)
    p = q * search.conj_grad(ge)
    p = torch.where(live, p, torch.zeros_like(p))
    p = p / p.sum(-1, keepdim=True)
    bad = (torch.isnan(logits) | (logits == math.inf)).any(-1, keepdim=True)
    p = torch.where(empty, torch.zeros_like(p), p)
    return torch.where(bad, torch.full_like(p, math.nan), p)


class _Search:
    """The bisection variable r of the reference (docs/divergences.md, "Tau bracket"), in which the
    bracket [tau_lo, tau_hi] is narrow relative to the root's resolution:

    * kl: r = tau (the bracket spans log(Q / q_max));
    * alpha: r = log y, y = 1 - (alpha - 1) tau, the base 1 + (alpha - 1) v at the argmax. Each entry's
      base is y + (alpha - 1) x = y (1 + (alpha - 1) x / y), so
      (f*)'(v) = exp((r + log1p((alpha - 1) x e^-r)) / (alpha - 1)). r spans (1 - alpha) log(Q / q_max)
      where tau spans (q_max^(1 - alpha) - Q^(1 - alpha)) / (alpha - 1): 2.7e42 at alpha = 20, V = 200
      (80 halvings leave tau at the bracket's end), an overflow at alpha = 1000;
    * reverse_kl, js: r = log sigma, sigma = pole + tau, the argmax's distance to the pole of (f*)' (at
      1, log 2): (f*)'(v) = 1 / d or 1 / expm1(d), d = sigma - x, exact however close to the pole
      (sigma = q_max or log1p(q_max) at tau_lo: 1e-30 for q = 1e-30, where tau = -1 + 1e-30 rounds to -1).
    """

    def __init__(self, family, alpha, theta, q):
        self.family, self.alpha, self.theta, self.q = family, alpha, theta, q

    def bracket(self, q_star, q_total):
        f, a = self.family, self.alpha
        if f in ("kl", "reverse_kl"):  # tau = log q, sigma = q at the bracket's ends
            return torch.log(q_star), torch.log(q_total)
        if f == "alpha":
            return (1 - a) * torch.log(q_star), (1 - a) * torch.log(q_total)
        return torch.log(torch.log1p(q_star)), torch.log(torch.log1p(q_total))  # js

    def conj_grad(self, r):
        """(f*)'(theta - tau) of every entry for the row's r ([rows, 1])."""
        f, a, x = self.family, self.alpha, self.theta
        if f == "kl":
            return torch.exp(x - r)
        if f == "alpha":
            w = (a - 1) * x * torch.exp(-r)  # (alpha - 1) x / y: -inf / +inf at masked entries
            inside = w > -1
            log_base = r + torch.log1p(torch.where(inside, w, torch.zeros_like(w)))
            return torch.where(inside, torch.exp(log_base / (a - 1)), torch.zeros_like(w))
        d = torch.exp(r) - x
        return 1 / d if f == "reverse_kl" else 1 / torch.expm1(d)

    def total(self, r):
        p = self.q * self.conj_grad(r)
        return torch.where(self.theta > -math.inf, p, torch.zeros_like(p)).sum(-1, keepdim=True)


def softargmax_vjp_reference(family, alpha, p, q, grad):
    """w (g - <w, g> / sum w), w = q (f*)''(theta - tau) = q / f''(p / q): the gradient of p* in the
    direction ``grad`` (implicit differentiation of sum p* = 1); 0 on an empty row."""
    w = jacobian_weights(family, alpha, p, q)
    total = w.sum(-1, keepdim=True)
    mean = (w * grad).sum(-1, keepdim=True) / torch.where(total > 0, total, torch.ones_like(total))
    return w * (grad - mean)


class _SoftargmaxReference(torch.autograd.Function):
    """p* by bisection, differentiated implicitly. The backward is made of differentiable ops of the
    saved output p*, so autograd gives the second derivative (double backward) too."""

    @staticmethod
    def forward(ctx, logits, q, family, alpha, n_iter):
        with torch.no_grad():
            p = _bisect_softargmax(logits, q, family, alpha, n_iter)
        ctx.save_for_backward(p, q)
        ctx.family, ctx.alpha = family, alpha
        return p

    @staticmethod
    def backward(ctx, grad):
        p, q = ctx.saved_tensors
        return softargmax_vjp_reference(ctx.family, ctx.alpha, p, q, grad), None, None, None, None


def _f_prime_tensor(family, alpha, u):
    if family == "kl":
        return torch.log(u)
    if family == "reverse_kl":
        return 1 - 1 / u
    if family == "alpha":
        return torch.expm1((alpha - 1) * torch.log(u)) / (alpha - 1)
    if family == "js":
        return torch.log(2 * u / (u + 1))
    raise ValueError(f"unknown f {family!r}")


def _q_f(family, alpha, p, q):
    """q f(p / q) per entry."""
    return q * f_value(family, alpha, p / q)


def divergence_f(family, alpha, p, q, live=None):
    """D_f(p, q) = sum q f(p / q) over the last dimension, over the ``live`` entries (default all)."""
    if live is None:
        return _q_f(family, alpha, p, q).sum(-1)
    p = torch.where(live, p, q)  # masked entries at u = 1 (f = f' = 0): no 0 * inf in the backward
    terms = _q_f(family, alpha, p, q)
    return torch.where(live, terms, torch.zeros_like(terms)).sum(-1)


def f_softmax_reference(logits, p, f="alpha", alpha=1.5, reference="uniform"):
    """softmax_f = <p, theta> - D_f(p, q) over the entries that are not -inf (-inf for an empty row)."""
    family, alpha = canonical_f(f, alpha)
    live = logits > -math.inf
    q = reference_measure(reference, logits)
    inner = (p * torch.where(live, logits, torch.zeros_like(logits))).sum(-1)  # no 0 * -inf in the backward
    value = inner - divergence_f(family, alpha, p, q, live)
    return torch.where(live.any(-1), value, torch.full_like(value, -math.inf))


def fy_loss_reference(logits, target, f="alpha", *, alpha=1.5, reference="uniform", n_iter=80):
    """Per-row Fenchel–Young loss ``<p* - y, theta> - D_f(p*, q) + D_f(y, q)`` for a probability target.

    Sums run over the entries that are not -inf; target mass on a -inf entry gives +inf; an all -inf
    row gives 0. ``reverse_kl``: ``D_f(y, q)`` is dropped (a constant in theta, infinite as soon as y
    has a zero), so the loss is ``<p* - y, theta> - D_f(p*, q)``.
    """
    family, alpha = canonical_f(f, alpha)
    p = f_softargmax_reference(logits, f, alpha=alpha, reference=reference, n_iter=n_iter)
    live = logits > -math.inf
    q = reference_measure(reference, logits)
    top = logits.amax(-1, keepdim=True)
    theta = torch.where(live, logits - top, torch.zeros_like(logits))  # shift-invariant: sum p = sum y
    loss = ((p - target) * theta).sum(-1) - divergence_f(family, alpha, p, q, live)
    if family != "reverse_kl":
        loss = loss + divergence_f(family, alpha, target, q, live)
    outside = ((target > 0) & ~live).any(-1)
    loss = torch.where(outside, torch.full_like(loss, math.inf), loss)
    return torch.where(live.any(-1), loss, torch.zeros_like(loss))


def entmax_exact(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact alpha-entmax (unit reference) by sorting, for alpha = 1.5 and alpha = 2 (tests)."""
    if alpha == 2.0:  # sparsemax of theta: p = [theta - tau]_+
        z, _ = torch.sort(logits, dim=-1, descending=True)
        k = torch.arange(1, logits.shape[-1] + 1, device=logits.device, dtype=logits.dtype)
        cssv = z.cumsum(-1) - 1
        support = (z - cssv / k) > 0
        kmax = support.sum(-1, keepdim=True)
        tau = cssv.gather(-1, kmax - 1) / kmax.to(logits.dtype)
        return torch.clamp(logits - tau, min=0)
    if alpha == 1.5:  # p = [theta/2 - tau]_+^2 (Peters et al. 2019, entmax15 exact)
        x = logits / 2
        z, _ = torch.sort(x, dim=-1, descending=True)
        k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
        mean = z.cumsum(-1) / k
        mean_sq = (z * z).cumsum(-1) / k
        ss = k * (mean_sq - mean * mean)
        delta = torch.clamp((1 - ss) / k, min=0)
        tau = mean - torch.sqrt(delta)
        support = (tau <= z).sum(-1, keepdim=True)
        tau_star = tau.gather(-1, support - 1)
        return torch.clamp(x - tau_star, min=0) ** 2
    raise ValueError("exact entmax only for alpha 1.5 and 2")
