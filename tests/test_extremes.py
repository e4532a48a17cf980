"""Inputs at the edge of float32 that used to give silent wrong answers, against float64 / closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from utils import generator

import fdistill
from fdistill._triton_dispatch import interpreter_enabled, triton_available
from fdistill.validation import MIN_TEMPERATURE

BACKENDS = ["cpu", "reference"] + (["triton"] if triton_available() and interpreter_enabled() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_with_a_1e20_logit(backend):
    """q is one-hot at the 1e20 entry: KL(q || p) = LSE(t) - t_0 = 1.4076..., and its gradient is 0
    (the kernels cancelled 1e20 - 1 against 1e20 - 2 and gave 0.4076, gradient -1)."""
    s = torch.tensor([[1e20, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 2.0]])
    want = math.log(math.e + 1 + math.e**2) - 1.0
    loss = fdistill.divergence_loss(s, t, "reverse_kl", backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert abs(loss.item() - want) <= 1e-6
    assert grad.abs().max().item() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "jeffreys", "forward_kl"])
def test_rows_with_one_huge_student_logit(divergence, backend, seed):
    """Rows whose student has one logit of 1e20 (or 1e30) among ordinary ones, vs float64."""
    g = generator(seed)
    s = torch.randn(4, 257, generator=g) * 3
    t = torch.randn(4, 257, generator=g) * 3
    s[0, 5], s[1, 0], s[2, 256], s[3, 100] = 1e20, 1e30, -1e20, 1e20
    s.requires_grad_()
    weight = torch.rand(4, generator=g) + 0.5
    loss = fdistill.divergence_loss(s, t, divergence, beta=0.3, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss, s, weight)
    s64 = s.detach().double().requires_grad_()
    want = fdistill.divergence_loss(
        s64, t.double(), divergence, beta=0.3, reduction="none", backend="reference"
    )
    (want_grad,) = torch.autograd.grad(want, s64, weight.double())
    finite = torch.isfinite(want)
    torch.testing.assert_close(loss.double()[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(loss), torch.isinf(want))
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5)


def test_tiny_temperature_is_refused_clearly():
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    for temperature in (1e-39, 1e-45, MIN_TEMPERATURE / 2):
        with pytest.raises(ValueError, match="temperature must be >="):
            fdistill.divergence_loss(s, t, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be >="):
            fdistill.fy_loss(s, torch.tensor([1, 2]), temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be >="):
            fdistill.fused_linear_divergence_loss(torch.randn(2, 4), torch.randn(8, 4), teacher_logits=t,
                                                  temperature=temperature)  # fmt: skip
    # the smallest allowed temperature gives finite losses (or +inf where the limit is), never NaN
    for divergence in fdistill.DIVERGENCES:
        loss = fdistill.divergence_loss(s, t, divergence, temperature=MIN_TEMPERATURE * 4, reduction="none")
        assert not torch.isnan(loss).any(), divergence


def test_grad_in_place_refuses_double_backward():
    s = torch.randn(3, 50, requires_grad=True)
    x = s.clone()
    loss = fdistill.divergence_loss(x, torch.randn(3, 50), "jsd", grad_in_place=True)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("n_iter", [0, -3, 2**31, 2**63, 1.5, True])
def test_n_iter_out_of_range_names_n_iter(n_iter):
    with pytest.raises(ValueError, match="n_iter must be None or an int in"):
        fdistill.f_softargmax(torch.randn(2, 5), n_iter=n_iter)
    with pytest.raises(ValueError, match="n_iter must be None or an int in"):
        fdistill.fy_loss(torch.randn(2, 5), torch.tensor([0, 1]), n_iter=n_iter)


def test_n_iter_at_the_limit_works():
    p = fdistill.f_softargmax(torch.randn(2, 5, dtype=torch.float64), n_iter=2**31 - 1)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, dtype=torch.float64))


def _mixture_rows64(s, t, divergence, param):
    """The mixture divergences written out in float64 (independent of fdistill): m in probability
    space, which float64 holds far below where float32 p and q underflow."""
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = ls.exp(), lt.exp()

    def kl(a, la, lb):  # sum a (la - lb), 0 where a = 0 (masked before the product: no 0 * inf in backward)
        live = a > 0
        zero = torch.zeros_like(a)
        return (a * (torch.where(live, la, zero) - torch.where(live, lb, zero))).sum(-1)

    if divergence == "jsd":
        lm = torch.log(param * p + (1 - param) * q)
        return param * kl(p, lt, lm) + (1 - param) * kl(q, ls, lm)
    if divergence == "skew_kl":
        return kl(p, lt, torch.log(param * p + (1 - param) * q))
    return kl(q, ls, torch.log(param * q + (1 - param) * p))  # skew_reverse_kl


def _check_mixture_against_float64(s, t, divergence, param, backend, weight):
    """Loss rows and d(sum weight * loss)/ds of ``backend`` vs _mixture_rows64 on the float64 inputs."""
    s = s.detach().requires_grad_()
    option = {"beta": param} if divergence == "jsd" else {"skew": param}
    loss = fdistill.divergence_loss(s, t, divergence, **option, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss, s, weight)
    s64 = s.detach().double().requires_grad_()
    want = _mixture_rows64(s64, t.double(), divergence, param)
    (want_grad,) = torch.autograd.grad(want, s64, weight.double())
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("param", [0.1, 0.5, 0.9])
def test_mixture_with_underflowing_probabilities(divergence, param, backend, seed):
    """Entries whose p and q span 1e-20 .. 1e-60 (below float32's minimum 1.2e-38, and across the
    kernels' switch to the log-space mixture at m = 2^-90): loss and gradient vs float64."""
    g = generator(seed)
    rows, vocab = 6, 1271
    s = torch.randn(rows, vocab, generator=g) * 2
    t = torch.randn(rows, vocab, generator=g) * 2
    depth = -torch.rand(rows, 200, generator=g) * 90 - 45  # log-probabilities about -45 .. -135
    s[:2, :200] += depth[:2]  # student alone
    t[2:4, 300:500] += depth[2:4]  # teacher alone
    s[4:, 600:800] += depth[4:]  # both, the teacher 0 .. 20 lower still
    t[4:, 600:800] += depth[4:] - torch.rand(2, 200, generator=g) * 20
    _check_mixture_against_float64(s, t, divergence, param, backend, torch.rand(rows, generator=g) + 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("param", [1e-46, 1e-30, 1 - 1e-7])
def test_mixture_with_a_vanishing_weight(divergence, param, backend, seed):
    """A mixture weight that underflows float32 (1e-46 rounds to 0 there, and 1e-30 p to 0 at
    p < 1e-15) where the other distribution is 0 (-inf logits): m = w p alone, log m = lt + log w,
    finite; formed as w p + w' q in float32 it would be 0 and the loss infinite."""
    g = generator(seed)
    rows, vocab = 4, 1271
    s = torch.randn(rows, vocab, generator=g) * 3
    t = torch.randn(rows, vocab, generator=g) * 3
    t[:, :40] -= 60  # p ~ 1e-27 there: w p underflows for w = 1e-30 as well
    s[:2, :100] = -math.inf  # q = 0: the student's weight alone is left in m
    t[2:, 100:200] = -math.inf
    s[2:, :100] = -math.inf
    assert torch.isfinite(_mixture_rows64(s.double(), t.double(), divergence, param)).all()
    _check_mixture_against_float64(s, t, divergence, param, backend, torch.rand(rows, generator=g) + 0.5)


@pytest.mark.parametrize("alpha", [-0.3, 2.5])
def test_alpha_infinite_rows_one_pass_and_two_pass_agree(alpha):
    """A student entry where the teacher is -inf (alpha < 0; the reverse for alpha > 1) makes the loss +inf:
    the one-pass gradient (from the row cache's stored terms) and the two-pass one (grad_in_place) agree."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(3, 301, generator=g), torch.randn(3, 301, generator=g)
    (teacher if alpha < 0 else student)[0, 7] = -math.inf
    grads = []
    for in_place in (False, True):
        s = student.clone().requires_grad_()
        loss = fdistill.divergence_loss(
            s, teacher, "alpha", alpha=alpha, reduction="none", backend="cpu", grad_in_place=in_place
        )
        assert torch.isinf(loss[0]) and torch.isfinite(loss[1:]).all()
        loss.sum().backward()
        grads.append(s.grad.clone())
    assert not torch.isfinite(grads[0][0]).all()  # the infinite row's gradient is not finite
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0, equal_nan=True)
