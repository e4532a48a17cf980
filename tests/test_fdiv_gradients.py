"""f_softargmax's first and second derivatives against finite differences (float64), every backend.

The gradient is the implicit-differentiation product w (g - <w, g> / sum w), w = q (f*)''(theta - tau):
the reference backend used to differentiate its bisection iterates instead (right for kl only), and
the double backward of the alpha family gave inf * 0 = NaN at p = 0. Sparsemax (alpha = 2, unit
reference) has a closed-form Jacobian, an independent check.
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import generator

import fdistill
from fdistill._triton_dispatch import interpreter_enabled, triton_available

F_CASES = [("kl", 1.5), ("reverse_kl", 1.5), ("alpha", 1.5), ("alpha", 1.25), ("alpha", 2.0), ("alpha", 0.7),
           ("js", 1.5)]  # fmt: skip
BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() and interpreter_enabled() else [])


def logits64(rows, vocab, seed, scale=2.0):
    return (torch.randn(rows, vocab, generator=generator(seed), dtype=torch.float64) * scale).requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reference", ["uniform", "unit", "tensor"])
@pytest.mark.parametrize("case", F_CASES, ids=[f"{f}{a}" for f, a in F_CASES])
def test_softargmax_first_and_second_derivatives(case, reference, backend, seed):
    f, alpha = case
    if backend == "triton" and (reference != "uniform" or f not in ("alpha", "js")):
        pytest.skip("the interpreter is slow; the other cases' math is the CPU kernels' (tested there)")
    x = logits64(3, 7, seed)
    q = reference
    if reference == "tensor":
        q = torch.rand(7, generator=generator(seed + 1), dtype=torch.float64).add(0.2)

    def fn(x):
        return fdistill.f_softargmax(x, f, alpha=alpha, reference=q, backend=backend)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    if backend != "triton":  # the kernels share one Python Jacobian product: its derivative is tested on cpu
        assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparsemax_jacobian_closed_form(backend, seed):
    """alpha = 2, unit reference: p = [theta - tau]_+, Jacobian diag(s) - s s^T / |s| on the support s."""
    x = logits64(1, 9, seed, scale=0.6)
    p = fdistill.f_softargmax(x, "alpha", alpha=2.0, reference="unit", backend=backend)
    s = (p.detach() > 0).double().reshape(-1)
    want = torch.diag(s) - torch.outer(s, s) / s.sum()
    rows = [torch.autograd.grad(p[0, j], x, retain_graph=True)[0].reshape(-1) for j in range(9)]
    torch.testing.assert_close(torch.stack(rows), want, rtol=0, atol=1e-10)
    assert 1 < s.sum() < 9  # a sparse support, not the trivial cases


@pytest.mark.parametrize("case", F_CASES, ids=[f"{f}{a}" for f, a in F_CASES])
def test_reference_nan_rows_are_nan(case):
    """A NaN or +inf logit makes its row NaN in the reference, as in the kernels and the docs."""
    f, alpha = case
    x = torch.randn(3, 6, dtype=torch.float64)
    x[0, 2] = math.nan
    x[1, 4] = math.inf
    for backend in ("reference", "cpu"):
        p = fdistill.f_softargmax(x, f, alpha=alpha, backend=backend)
        assert torch.isnan(p[:2]).all() and torch.isfinite(p[2]).all(), backend
        v = fdistill.f_softmax(x, f, alpha=alpha, backend=backend)
        assert torch.isnan(v[:2]).all() and torch.isfinite(v[2]), backend
        loss = fdistill.fy_loss(x, torch.tensor([0, 1, 2]), f, alpha=alpha, reduction="none", backend=backend)
        assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2]), backend


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", F_CASES, ids=[f"{f}{a}" for f, a in F_CASES])
def test_f_softmax_gradient_is_p_with_masked_entries(case, backend, seed):
    """d f_softmax / d theta = p*, also where some logits are -inf (the reference gave NaN there)."""
    f, alpha = case
    x = logits64(3, 9, seed).detach()
    x[0, :3] = -math.inf
    x.requires_grad_()
    value = fdistill.f_softmax(x, f, alpha=alpha, backend=backend)
    (grad,) = torch.autograd.grad(value.sum(), x)
    p = fdistill.f_softargmax(x.detach(), f, alpha=alpha, backend="reference")
    torch.testing.assert_close(grad, p, rtol=1e-9, atol=1e-12)
