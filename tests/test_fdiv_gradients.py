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
from utils import SKIP_WITHOUT_TRITON, TRITON_DEVICE, generator

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


def _vjp64(f, alpha, p, q, g):
    """w_j sum_k w_k (g_j - g_k) / sum w in float64, O(V^2): the Jacobian product without the cancellation of
    g_j - <w, g> / sum w at an entry that holds most of the weight (an independent float64 check)."""
    from fdistill.fdiv_reference import canonical_f, jacobian_weights

    family, alpha = canonical_f(f, alpha)
    w = jacobian_weights(family, alpha, p, q)
    diff = g.unsqueeze(-1) - g.unsqueeze(-2)  # [rows, V, V]: g_j - g_k
    diff = torch.where((w > 0).unsqueeze(-1) & (w > 0).unsqueeze(-2), diff, torch.zeros_like(diff))
    total = w.sum(-1, keepdim=True)
    return w * (diff * w.unsqueeze(-2)).sum(-1) / torch.where(total > 0, total, torch.ones_like(total))


@pytest.mark.parametrize("reference", ["uniform", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("case", F_CASES, ids=[f"{f}{a}" for f, a in F_CASES])
def test_fused_softargmax_backward_against_float64(case, dtype, reference, seed):
    """The CPU backward (fdiv_softargmax_bwd: one read of p* and g) on peaked rows (logits x 4) with -inf
    entries and an empty row, against the float64 product from the same p* and g."""
    f, alpha = case
    g64 = generator(seed)
    x = torch.randn(4, 1271, generator=g64, dtype=torch.float64) * 4
    x[0, :100] = -math.inf
    x[3] = -math.inf
    q = "uniform"
    if reference == "tensor":
        q = (torch.rand(1271, generator=g64, dtype=torch.float64) + 0.1).to(dtype)
    xx = x.to(dtype).requires_grad_()
    p = fdistill.f_softargmax(xx, f, alpha=alpha, reference=q, backend="cpu")
    g = torch.randn(p.shape, generator=g64, dtype=torch.float64).to(dtype)
    (got,) = torch.autograd.grad(p, xx, g)
    q64 = torch.full((4, 1271), 1 / 1271, dtype=torch.float64)
    if reference == "tensor":
        q64 = q.double().expand(4, -1)
    want = _vjp64(f, alpha, p.detach().double(), q64, g.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert ((got.double() - want).abs() <= tol * scale).all(), ((got.double() - want).abs() / scale).max()
    assert (got[3] == 0).all() and (got[0, :100] == 0).all()


@SKIP_WITHOUT_TRITON
@pytest.mark.parametrize("reference", ["uniform", "tensor"])
@pytest.mark.parametrize("case", F_CASES, ids=[f"{f}{a}" for f, a in F_CASES])
def test_triton_fused_softargmax_backward_against_float64(case, reference, seed):
    """The Triton backward (fdiv_softargmax_bwd_triton) on peaked fp32 rows with -inf entries and an empty
    row, against the float64 product from the same p* and g, and against the CPU op."""
    from fdistill.triton import fdiv  # noqa: F401  (registers the op)

    f, alpha = case
    g64 = generator(seed)
    x = torch.randn(4, 1271, generator=g64, dtype=torch.float64) * 4
    x[0, :100] = -math.inf
    x[3] = -math.inf
    q64 = torch.full((4, 1271), 1 / 1271, dtype=torch.float64)
    ref, value = None, 1 / 1271
    if reference == "tensor":
        q64 = (torch.rand(1271, generator=g64, dtype=torch.float64) + 0.1).expand(4, -1)
        ref, value = q64.float(), 1.0
    p = fdistill.f_softargmax(x.float(), f, alpha=alpha, reference="uniform" if ref is None else ref[0])
    g = torch.randn(p.shape, generator=g64, dtype=torch.float64).float()
    dev = TRITON_DEVICE
    got = torch.ops.fdistill.fdiv_softargmax_bwd_triton(
        g.to(dev), p.to(dev), None if ref is None else ref.to(dev), f, alpha, value, 2.0
    ).cpu()
    want = _vjp64(f, alpha, p.double(), q64, g.double()) / 2.0
    scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert ((got.double() - want).abs() <= 1e-5 * scale).all(), ((got.double() - want).abs() / scale).max()
    assert (got[3] == 0).all() and (got[0, :100] == 0).all()
    cpu = torch.ops.fdistill.fdiv_softargmax_bwd(g, p, ref, f, alpha, value, 2.0)
    torch.testing.assert_close(got, cpu, rtol=1e-5, atol=1e-7 * scale.max().item())


def test_fused_softargmax_backward_opcheck():
    p = fdistill.f_softargmax(torch.randn(3, 50), "alpha", alpha=1.5, reference="unit", backend="cpu")
    q = torch.rand(50) + 0.1
    for reference, value in ((None, 1.0), (q.expand(3, 50), 1.0)):
        args = (torch.randn(3, 50), p, reference, "alpha", 1.5, value, 1.0)
        torch.library.opcheck(torch.ops.fdistill.fdiv_softargmax_bwd, args)


def test_fused_softargmax_backward_propagates_a_nan_gradient_as_the_composed_one():
    """A NaN upstream gradient at an entry outside the support (w = 0) makes the row NaN in both products."""
    x = torch.randn(2, 40, dtype=torch.float64, generator=generator(5)) * 3
    x[:, :5] = -math.inf
    xx = x.requires_grad_()
    p = fdistill.f_softargmax(xx, "alpha", alpha=1.5, reference="unit", backend="cpu")
    g = torch.randn_like(p)
    g[0, 0] = math.nan  # a masked entry of row 0
    (fused,) = torch.autograd.grad(p, xx, g, retain_graph=True)
    (composed,) = torch.autograd.grad(p, xx, g, create_graph=True)
    assert torch.isnan(fused[0]).all() and torch.isfinite(fused[1]).all()
    torch.testing.assert_close(fused.detach(), composed.detach(), equal_nan=True, rtol=1e-12, atol=1e-14)
