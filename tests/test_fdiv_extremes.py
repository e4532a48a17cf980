"""f-divergence operators and FY losses at the extremes of alpha, against mpmath (50 digits).

Near alpha = 1 the alpha family's (f*)'(v) = [1 + (alpha - 1) v]^(1/(alpha - 1)) and its generator
(u^alpha - 1 - alpha (u - 1)) / (alpha (alpha - 1)) cancel when formed as written (in float32,
1 + 1e-6 v keeps two digits of (alpha - 1) v): the kernels and the reference take the log1p / expm1
forms of docs/divergences.md. The ground truth here is independent of them: tau by bisection in
mpmath on the generator as written, at 50 digits.
"""

from __future__ import annotations

import mpmath
import pytest
import torch
from utils import SKIP_WITHOUT_TRITON, TRITON_INTERPRETER_WARNINGS, generator

import fdistill

mpmath.mp.dps = 50
# 1.25, 4/3 and 1.125 (1 / (alpha - 1) = 4, 3, 8): the kernels' power kind (multiplications, no exp / log1p)
ALPHAS = [1 + 1e-6, 1 - 1e-6, 1 + 1e-3, 1.25, 4 / 3, 1.125, 1.3, 0.7]
ALPHA_IDS = ["1+1e-6", "1-1e-6", "1+1e-3", "1.25", "4/3", "1.125", "1.3", "0.7"]
BACKENDS = [
    "cpu",
    "reference",
    pytest.param("triton", marks=[SKIP_WITHOUT_TRITON, *TRITON_INTERPRETER_WARNINGS]),
]
# float32: p is exact to a few ulps of the largest entry, the loss to a few ulps of its terms
TOL = {torch.float64: (1e-11, 1e-11), torch.float32: (2e-6, 2e-6)}


def _conj_grad(alpha, v):
    x = 1 + (alpha - 1) * v
    return mpmath.mpf(0) if x <= 0 else x ** (1 / (alpha - 1))


def _f(alpha, u):
    return (u**alpha - 1 - alpha * (u - 1)) / (alpha * (alpha - 1))


def mp_softargmax(theta, q, alpha):
    """p* = q (f*)'(theta - tau), sum p* = 1, tau by 200 bisection steps in mpmath."""
    a = mpmath.mpf(alpha)
    th = [mpmath.mpf(x) for x in theta]
    qs = [mpmath.mpf(x) for x in q]

    def total(tau):
        return sum(qj * _conj_grad(a, t - tau) for qj, t in zip(qs, th, strict=True))

    # total(lo) > 1 > total(hi) for these rows; alpha < 1: lo just inside the pole at v = 1 / (1 - alpha)
    lo = max(th) - (60 if a > 1 else 1 / (1 - a) - mpmath.mpf(10) ** -40)
    hi = max(th) + 60
    assert total(lo) > 1 > total(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > 1 else (lo, mid)
    return [qj * _conj_grad(a, t - lo) for qj, t in zip(qs, th, strict=True)]


def mp_fy_loss(theta, y, q, alpha):
    """<p* - y, theta> - D_f(p*, q) + D_f(y, q) with f as written."""
    a = mpmath.mpf(alpha)
    p = mp_softargmax(theta, q, alpha)
    th = [mpmath.mpf(x) for x in theta]
    ys = [mpmath.mpf(x) for x in y]
    qs = [mpmath.mpf(x) for x in q]
    inner = sum((pj - yj) * t for pj, yj, t in zip(p, ys, th, strict=True))
    d_p = sum(qj * _f(a, pj / qj) for pj, qj in zip(p, qs, strict=True))
    d_y = sum(qj * _f(a, yj / qj) for yj, qj in zip(ys, qs, strict=True))
    return inner - d_p + d_y, p


def _rows(seed, rows=3, vocab=9):
    g = generator(seed)
    theta = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    y = torch.softmax(torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1)
    q = torch.rand(rows, vocab, generator=g, dtype=torch.float64) + 0.05
    q = q / q.sum(-1, keepdim=True)
    return theta, y, q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("alpha", ALPHAS, ids=ALPHA_IDS)
def test_alpha_softargmax_and_fy_loss_against_mpmath(alpha, dtype, backend, seed):
    theta64, y64, q64 = _rows(seed)
    want_loss, want_p = [], []
    for i in range(theta64.shape[0]):
        loss, p = mp_fy_loss(theta64[i].tolist(), y64[i].tolist(), q64[i].tolist(), alpha)
        want_loss.append(float(loss))
        want_p.append([float(x) for x in p])
    want_loss = torch.tensor(want_loss, dtype=torch.float64)
    want_p = torch.tensor(want_p, dtype=torch.float64)
    theta = theta64.to(dtype).requires_grad_(True)
    y, q = y64.to(dtype), q64.to(dtype)
    rtol, atol = TOL[dtype]
    p = fdistill.f_softargmax(theta.detach(), "alpha", alpha=alpha, reference=q, backend=backend)
    torch.testing.assert_close(p.double(), want_p, rtol=rtol, atol=atol)
    loss = fdistill.fy_loss(theta, y, "alpha", alpha=alpha, reference=q, reduction="none", backend=backend)
    torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=atol)
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    torch.testing.assert_close(grad.double(), want_p - y64, rtol=rtol, atol=atol)  # dL/dtheta = p* - y


@pytest.mark.parametrize("alpha", [1 + 1e-6, 1 - 1e-6], ids=["1+1e-6", "1-1e-6"])
def test_alpha_near_one_approaches_kl(alpha, seed):
    """|p_alpha - p_kl| = O(|alpha - 1|): at 1e-6 the float32 kernel is within float32 rounding of softmax."""
    theta64, _, q64 = _rows(seed, rows=4, vocab=1271)
    want = fdistill.f_softargmax(theta64, "kl", reference=q64, backend="cpu")
    got = fdistill.f_softargmax(theta64.float(), "alpha", alpha=alpha, reference=q64.float(), backend="cpu")
    assert ((got.double() - want).abs() / want).max() < 1e-4


def _mp_conj_grad(family, alpha, v):
    """(f*)'(v) on its domain, +inf at and beyond a pole (the bisection never goes there)."""
    if family == "reverse_kl":
        return 1 / (1 - v) if v < 1 else mpmath.inf
    if family == "js":
        e = mpmath.exp(v)
        return e / (2 - e) if e < 2 else mpmath.inf
    x = 1 + (alpha - 1) * v
    if x <= 0:
        return mpmath.mpf(0) if alpha > 1 else mpmath.inf
    return x ** (1 / (alpha - 1))


def _mp_f_prime(family, alpha, u):
    if family == "reverse_kl":
        return 1 - 1 / u
    if family == "js":
        return mpmath.log(2 * u / (u + 1))
    return (u ** (alpha - 1) - 1) / (alpha - 1)


def mp_softargmax_family(theta, q, family, alpha):
    """p* by 400 bisection steps in mpmath on the bracket [-f'(1 / q_max), -f'(1 / Q)] of tau."""
    a = mpmath.mpf(alpha)
    th = [mpmath.mpf(x) for x in theta]
    qs = [mpmath.mpf(x) for x in q]
    top = max(th)
    xs = [t - top for t in th]
    q_max = qs[th.index(top)]

    def total(tau):
        return sum(qj * _mp_conj_grad(family, a, x - tau) for qj, x in zip(qs, xs, strict=True))

    lo, hi = -_mp_f_prime(family, a, 1 / q_max), -_mp_f_prime(family, a, 1 / sum(qs))
    if family == "alpha" and a > 1:  # halve log(1 - (a - 1) tau): the tau bracket is ~q^(1 - a) wide
        to_tau = lambda r: (1 - mpmath.exp(r)) / (a - 1)  # noqa: E731
        lo_r, hi_r = mpmath.log(1 - (a - 1) * lo), mpmath.log(1 - (a - 1) * hi)
        for _ in range(400):
            mid = (lo_r + hi_r) / 2
            lo_r, hi_r = (mid, hi_r) if total(to_tau(mid)) >= 1 else (lo_r, mid)
        lo = to_tau(lo_r)
    for _ in range(400):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) >= 1 else (lo, mid)
    p = [qj * _mp_conj_grad(family, a, x - lo) for qj, x in zip(qs, xs, strict=True)]
    s = sum(p)
    return [float(pj / s) for pj in p]


def _mp_rows(theta64, q64, family, alpha):
    rows = [
        mp_softargmax_family(t.tolist(), qq.tolist(), family, alpha)
        for t, qq in zip(theta64, q64, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float64)


TINY_Q_CASES = [("alpha", 0.7), ("js", 1.5), ("reverse_kl", 1.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("family", "alpha"), TINY_Q_CASES, ids=["a0.7", "js", "rkl"])
def test_reference_with_a_tiny_reference_measure(family, alpha, dtype, seed):
    """q = 1e-30 everywhere: the argmax sits 1e-30 from the pole of (f*)' (tau = -1 + 1e-30 for reverse KL
    does not exist in float64): p* is the one-hot at the argmax to 1e-9, where the tau bisection gave NaN."""
    theta64, _, _ = _rows(seed, rows=3, vocab=9)
    q64 = torch.full_like(theta64, 1e-30)
    want = _mp_rows(theta64, q64, family, alpha)
    got = fdistill.f_softargmax(
        theta64.to(dtype), family, alpha=alpha, reference=q64.to(dtype), backend="reference"
    )
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_reference_with_a_large_alpha(seed):
    """alpha = 20: the tau bracket is 1e42 wide and 80 halvings left tau at its end (the uniform p); the
    reference bisects log(1 + (alpha - 1) v) at the argmax. Where an entry enters the support p_j =
    q_j z^(1/19) is steep in z = 1 + 19 v (z = 1e-14, float64's resolution there, gives 0.18 q_j): entries
    are checked to 0.2 q_j, the old uniform answer was off by q_j. alpha = 1000: f'(1 / q_max) overflowed
    (NaN); only a finite, normalised p is checked ((1e-300)^(1/999) is 0.5)."""
    theta64, _, q64 = _rows(seed, rows=3, vocab=40)
    got = fdistill.f_softargmax(theta64, "alpha", alpha=20.0, reference=q64, backend="reference")
    err = (got - _mp_rows(theta64, q64, "alpha", 20.0)).abs()
    assert (err <= 1e-10 + 0.2 * q64).all(), err.max()
    for dtype in (torch.float32, torch.float64):
        p = fdistill.f_softargmax(
            theta64.to(dtype), "alpha", alpha=1000.0, reference=q64.to(dtype), backend="reference"
        )
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.double().sum(-1), torch.ones(3, dtype=torch.float64))


KERNEL_BACKENDS = [
    "cpu",
    pytest.param("triton", marks=[SKIP_WITHOUT_TRITON, *TRITON_INTERPRETER_WARNINGS]),
]


TINY_Q_KERNEL_CASES = [("js", 1.5), ("reverse_kl", 1.5), ("alpha", 0.7), ("alpha", 0.1), ("alpha", 1 - 1e-6)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("family", "alpha"), TINY_Q_KERNEL_CASES, ids=["js", "rkl", "a0.7", "a0.1", "a1-1e-6"]
)
def test_kernels_with_a_tiny_reference_measure(family, alpha, dtype, backend, seed):
    """The kernels search sigma = tau + pole, the argmax's distance to the pole of (f*)' (reverse KL, JS), and
    r = log(1 - (alpha - 1) tau) (alpha): with q = 1e-30 they gave NaN in every dtype (tau = -1 + 1e-30 is
    -1), and alpha = 0.7 put 0.97 on a non-argmax entry in float32 (1 + (alpha - 1) v lost the argmax's
    s ~ q^0.3 = 1e-9); p* is the one-hot at the argmax (alpha near 1: close to softmax)."""
    theta64, _, _ = _rows(seed, rows=3, vocab=9)
    q64 = torch.full_like(theta64, 1e-30)
    want = _mp_rows(theta64, q64, family, alpha)
    got = fdistill.f_softargmax(
        theta64.to(dtype), family, alpha=alpha, reference=q64.to(dtype), backend=backend
    )
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("alpha", [20.0, 1000.0], ids=["a20", "a1000"])
def test_kernels_with_a_large_alpha(alpha, dtype, backend, seed):
    """alpha = 1000: tau's bracket end (1 - q^(1 - alpha)) / (alpha - 1) overflows (NaN); the kernels search
    r = log(1 - (alpha - 1) tau), whose end is -(alpha - 1) log q. Against mpmath where the problem allows.
    An entry entering the support has p_j = q_j z^(1/(alpha - 1)), steep in its base z (relative to the
    argmax's): an ulp of z moves it by q_j (eps (alpha - 1) |x|)^(1/(alpha - 1)), 0.2 q_j at alpha = 20 in
    float64 and 0.6 q_j in float32. At alpha = 1000 no dtype resolves such an entry (z ~ 1e-50 gives
    0.9 q_j; nor does mpmath at 50 digits): S0 jumps over 1 when it enters, and the kernels keep the side
    nearer 1 (TauSearch::best_t), so the entries well inside the support (p_j >= 0.99 q_j, z >= 4e-5) are
    exact up to that renormalisation (< half a jump, 0.5 q_max), and the edge entries lie in [0, q_j]."""
    theta64, _, q64 = _rows(seed, rows=3, vocab=40)
    want = _mp_rows(theta64, q64, "alpha", alpha)
    got = fdistill.f_softargmax(
        theta64.to(dtype), "alpha", alpha=alpha, reference=q64.to(dtype), backend=backend
    )
    got = got.double()
    torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=torch.float64))
    atol = 1e-10 if dtype == torch.float64 else 1e-5
    err = (got - want).abs()
    if alpha == 20:
        c = alpha - 1
        assert (err <= atol + q64 * (torch.finfo(dtype).eps * c * 16) ** (1 / c)).all(), (err / q64).max()
        return
    inside = want >= 0.99 * q64
    assert inside.sum() > 20  # most of the vocabulary
    renorm = 0.5 * q64.amax(-1, keepdim=True) * want
    assert (err <= atol + renorm)[inside].all(), (err / want)[inside].max()
    assert ((got >= 0) & (got <= q64 * (1 + 1e-4)))[~inside].all()


@pytest.mark.parametrize(("family", "alpha"), [("js", 1.5), ("reverse_kl", 1.5), ("alpha", 0.5)],
                         ids=["js", "reverse_kl", "hellinger"])  # fmt: skip
def test_pole_families_float32_at_a_large_vocabulary(family, alpha, seed):
    """V = 256001, uniform q: sigma ~ q_max = 4e-6, which float32's tau = -1 + sigma held to 3%: p* was 1.3e-3
    off for reverse KL (8.5e-6 for JS; Hellinger, alpha = 0.5 with its pole at v = 2, 2%); against the
    float64 kernel, itself checked by the reference."""
    theta64 = torch.randn(2, 256001, generator=generator(seed), dtype=torch.float64) * 2
    want = fdistill.f_softargmax(theta64, family, alpha=alpha, backend="reference")
    got64 = fdistill.f_softargmax(theta64, family, alpha=alpha, backend="cpu")
    torch.testing.assert_close(got64, want, rtol=0, atol=1e-12)
    got = fdistill.f_softargmax(theta64.float(), family, alpha=alpha, backend="cpu")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
