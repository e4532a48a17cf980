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
