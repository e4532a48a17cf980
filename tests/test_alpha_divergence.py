"""The Amari alpha divergence near alpha = 0 and 1 and at large |alpha|, against mpmath at 50 digits.

The truth is computed from the exact binary values of the logits the kernels read:
``A = sum exp(alpha lt + (1 - alpha) ls)``, ``loss = (1 - A) / (alpha (1 - alpha))`` and the gradient
``(A / alpha) (q - r)``, ``r = p^alpha q^(1 - alpha) / A``, all in ``mp.mpf``. The forms the kernels use
(Student, Teacher, Log: docs/divergences.md, "Amari alpha") are not used here.

Tolerances. A kernel computes in the input's precision (u = 2^-24 for float32, 2^-53 for float64).
Its log-probabilities then carry an absolute error of a few u |ls| (|ls| <= ~20 here), and a sum of
terms whose magnitudes add up to ``sum |terms|`` carries a few u of that; both are amplified by
``(sum |terms|) / |1 - A|``, which the Student / Teacher forms keep O(1) (X = lt - ls is O(1) for these
logits, and ``1 - A ~ alpha X`` is never formed as ``1 - (1 - small)``). So the loss is good to
``RTOL[dtype]`` = 2^7 u (the slack covers the vocabulary sum and the O(10) log-probabilities). In the
Log form the mixture logit ``alpha t + (1 - alpha) s`` is rounded per entry: ``log A`` carries
~u (|alpha| + |1 - alpha|) max |logit| absolutely, and the loss (proportional to A) that relatively.
Gradients are compared norm-wise, max |g - g*| / max |g*|, with the same budget.
"""

from __future__ import annotations

import functools
import math

import mpmath as mp
import pytest
import torch
from utils import cpu_capability, generator, hardware_capabilities, seed_from

import fdistill
from fdistill._triton_dispatch import interpreter_enabled, triton_available

BACKENDS = ["cpu", "reference"] + (["triton"] if triton_available() and interpreter_enabled() else [])
DTYPES = {"float32": torch.float32, "float64": torch.float64}
U = {"float32": 2.0**-24, "float64": 2.0**-53}
RTOL = {name: 2**7 * u for name, u in U.items()}  # 7.6e-6 (float32), 1.4e-14 (float64)
# near the ends of (0, 1), at the switch points (+-1/2, 3/2) of the forms, and far outside
ALPHAS = [1e-7, 1e-5, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-5, 1 - 1e-7, -50.0, 20.0, 3.0, -1.0]
SWITCHES = [-0.5, -0.5 - 2**-20, 0.5 + 2**-20, 1.5, 1.5 + 2**-20, -1e-6, 1 + 1e-6]


def logit_scale(alpha: float) -> float:
    """Logits of standard deviation 2, smaller at large |alpha| so that the float32 loss is finite."""
    return min(2.0, 8.0 / abs(alpha))


@mp.workdps(50)
def mp_alpha(s: torch.Tensor, t: torch.Tensor, alpha: float):
    """(loss [rows], gradient in s [rows][V]) at 50 digits, from the exact values of s and t."""
    a = mp.mpf(alpha)
    losses, grads = [], []
    for s_row, t_row in zip(s.double().tolist(), t.double().tolist(), strict=True):
        sm = [mp.mpf(x) for x in s_row]
        tm = [mp.mpf(x) for x in t_row]
        lse_s = mp.log(mp.fsum(mp.exp(x) for x in sm))
        lse_t = mp.log(mp.fsum(mp.exp(x) for x in tm))
        ls = [x - lse_s for x in sm]
        lt = [x - lse_t for x in tm]
        # p^alpha q^(1 - alpha); a masked entry (both -inf) adds 0
        terms = [
            mp.exp(a * y + (1 - a) * x) if x > -mp.inf or y > -mp.inf else mp.mpf(0)
            for x, y in zip(ls, lt, strict=True)
        ]
        big_a = mp.fsum(terms)
        losses.append((1 - big_a) / (a * (1 - a)))
        # (A / alpha) (q - r) = (q A - p^alpha q^(1 - alpha)) / alpha
        grads.append([(mp.exp(x) * big_a - w) / a for x, w in zip(ls, terms, strict=True)])
    return losses, grads


@functools.cache
def case(dtype_name: str, vocab: int, alpha: float):
    """Fresh logits for (dtype, V, alpha) and their mpmath loss and gradient (shared by the backends)."""
    g = generator(seed_from(f"alpha-divergence:{dtype_name}:{vocab}:{alpha!r}"))
    scale = logit_scale(alpha)
    s = (torch.randn(2, vocab, generator=g, dtype=torch.float64) * scale).to(DTYPES[dtype_name])
    t = (torch.randn(2, vocab, generator=g, dtype=torch.float64) * scale).to(DTYPES[dtype_name])
    return s, t, *mp_alpha(s, t, alpha)


def log_tolerance(alpha: float, s: torch.Tensor, t: torch.Tensor, u: float) -> float:
    """The Log form's error budget: u (|alpha| + |1 - alpha|) max |logit| in log A, 64x slack."""
    big = max(s.abs().max().item(), t.abs().max().item())
    return 64 * u * (abs(alpha) + abs(1 - alpha)) * big


def tolerance(alpha, s, t, dtype_name):
    rtol = RTOL[dtype_name]
    if not -0.5 <= alpha <= 1.5:  # the Log form
        rtol = max(rtol, log_tolerance(alpha, s, t, U[dtype_name]))
    return rtol


def loss_and_grad(s, t, alpha, backend, **kwargs):
    x = s.clone().requires_grad_()
    loss = fdistill.divergence_loss(x, t, "alpha", alpha=alpha, reduction="none", backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.double(), grad.double()


def assert_matches_mp(loss, grad, want_loss, want_grad, rtol, what):
    want = torch.tensor([float(x) for x in want_loss], dtype=torch.float64)
    rel = ((loss - want).abs() / want.abs()).max().item()
    assert rel <= rtol, f"{what}: loss {loss.tolist()} vs {want.tolist()}: error {rel:.2e} > {rtol:.1e}"
    want_g = torch.tensor([[float(x) for x in row] for row in want_grad], dtype=torch.float64)
    err = ((grad - want_g).abs().max() / want_g.abs().max()).item()
    assert err <= rtol, f"{what}: gradient error {err:.2e} (relative to max |grad|) > {rtol:.1e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1271, 7])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("alpha", ALPHAS + SWITCHES, ids=repr)
def test_alpha_against_mpmath(alpha, dtype_name, vocab, backend):
    s, t, want_loss, want_grad = case(dtype_name, vocab, alpha)
    loss, grad = loss_and_grad(s, t, alpha, backend)
    what = f"{backend} {dtype_name} V={vocab} alpha={alpha!r}"
    assert_matches_mp(loss, grad, want_loss, want_grad, tolerance(alpha, s, t, dtype_name), what)


@pytest.mark.parametrize("isa", hardware_capabilities())
@pytest.mark.parametrize("alpha", [1e-7, 1 - 1e-7, -0.5, 1.5, -50.0], ids=repr)
def test_alpha_cpu_instruction_sets(alpha, isa):
    """The CPU kernels' vector paths (default, AVX2, AVX-512: each its own copy of the header's formulas)."""
    for dtype_name in DTYPES:
        s, t, want_loss, want_grad = case(dtype_name, 1271, alpha)
        with cpu_capability(isa):
            loss, grad = loss_and_grad(s, t, alpha, "cpu")
        what = f"cpu/{isa} {dtype_name} alpha={alpha!r}"
        assert_matches_mp(loss, grad, want_loss, want_grad, tolerance(alpha, s, t, dtype_name), what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1e-5, 0.3, 1 - 1e-5, 1.2, -0.3, 3.0, -1.0], ids=repr)
def test_alpha_masked_entries(alpha, backend):
    """-inf entries in both (masked), and, for alpha in (0, 1), a teacher 0 where the student has mass
    and the reverse: those terms of A are exactly 0, the loss finite."""
    g = generator(seed_from(f"alpha-masked:{alpha!r}"))
    s = torch.randn(2, 40, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 40, generator=g, dtype=torch.float64) * 2
    s[:, 3] = t[:, 3] = -math.inf
    if 0 < alpha < 1:
        s[0, 7], t[1, 11] = -math.inf, -math.inf
    want_loss, want_grad = mp_alpha(s, t, alpha)
    for dtype_name, dtype in DTYPES.items():
        loss, grad = loss_and_grad(s.to(dtype), t.to(dtype), alpha, backend)
        rtol = tolerance(alpha, s.clamp(min=-10), t.clamp(min=-10), dtype_name)
        assert torch.isfinite(grad).all()
        what = f"{backend} {dtype_name} masked alpha={alpha!r}"
        assert_matches_mp(loss, grad, want_loss, want_grad, rtol, what)


def logits_with_loss(alpha: float, log_loss: float, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits times c against uniform ones, c chosen (bisection in float64) so that the log of
    the alpha loss is ``log_loss``. The random side is the one A grows with: the student for alpha > 1
    (A = sum p^alpha / q^(alpha - 1)), the teacher for alpha < 0 (A = sum q^(1 - alpha) / p^-alpha)."""
    g = generator(seed_from(f"alpha-large:{alpha!r}:{log_loss!r}"))
    base = torch.randn(1, vocab, generator=g, dtype=torch.float64)
    flat = torch.zeros(1, vocab, dtype=torch.float64)

    def pair(c):  # (student, teacher)
        return (base * c, flat) if alpha > 1 else (flat, base * c)

    def log_loss_at(c):  # log A - log(alpha (alpha - 1)), A >> 1
        s, t = pair(c)
        z = alpha * torch.log_softmax(t, -1) + (1 - alpha) * torch.log_softmax(s, -1)
        return (torch.logsumexp(z, -1) - math.log(alpha * (alpha - 1))).item()

    lo, hi = 0.0, 1.0
    while log_loss_at(hi) < log_loss:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_loss_at(mid) < log_loss else (lo, mid)
    return pair(hi)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [-50.0, 20.0, 100.0], ids=repr)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_alpha_large_is_finite_where_the_loss_is(alpha, dtype_name, backend):
    """A overflows the dtype while the loss (A - 1) / (alpha (alpha - 1)) and the gradient, whose scale
    is A / alpha, do not: both are finite and right. A loss beyond the dtype's range is +inf."""
    dtype = DTYPES[dtype_name]
    top = math.log(torch.finfo(dtype).max)
    # the gradient's scale A / alpha = |1 - alpha| loss just inside the range (e^-2 of the top), so that
    # A = |alpha| (A / alpha) overflows (|alpha| > e^2)
    s, t = logits_with_loss(alpha, top - 2 - math.log(abs(1 - alpha)))
    s, t = s.to(dtype), t.to(dtype)
    want_loss, want_grad = mp_alpha(s, t, alpha)
    assert mp.log(abs(1 - want_loss[0]) * abs(alpha * (1 - alpha))) > top  # A itself overflows
    loss, grad = loss_and_grad(s, t, alpha, backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad.abs().max())
    rtol = max(RTOL[dtype_name], log_tolerance(alpha, s, t, U[dtype_name]))
    assert_matches_mp(loss, grad, want_loss, want_grad, rtol, f"{backend} {dtype_name} alpha={alpha!r}")
    # beyond the range: +inf, not NaN
    s, t = logits_with_loss(alpha, top + 2)
    loss, _ = loss_and_grad(s.to(dtype), t.to(dtype), alpha, backend)
    assert torch.isposinf(loss).all(), loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1 - 1e-6, 1 - 1e-9, 1 + 1e-7, 1e-6, -1e-8], ids=repr)
def test_alpha_gradcheck_near_the_ends(alpha, backend):
    g = generator(seed_from(f"alpha-gradcheck:{alpha!r}:{backend}"))
    s = (torch.randn(3, 13, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(3, 13, generator=g, dtype=torch.float64) * 2

    def loss(x):
        return fdistill.divergence_loss(x, t, "alpha", alpha=alpha, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(loss, (s,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_limits_are_the_kls(backend, seed):
    """alpha -> 1 is KL(p||q) - (1 - alpha) (...), alpha -> 0 is KL(q||p): at 1e-9 from the ends the
    float64 loss equals the KL to ~1e-8 relative (the first-order term of the series)."""
    g = generator(seed)
    s = torch.randn(4, 300, generator=g, dtype=torch.float64) * 2
    t = torch.randn(4, 300, generator=g, dtype=torch.float64) * 2
    kl = {
        d: fdistill.divergence_loss(s, t, d, reduction="none", backend=backend)
        for d in ("forward_kl", "reverse_kl")
    }
    for alpha, want in ((1 - 1e-9, kl["forward_kl"]), (1e-9, kl["reverse_kl"])):
        got = fdistill.divergence_loss(s, t, "alpha", alpha=alpha, reduction="none", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=0)
