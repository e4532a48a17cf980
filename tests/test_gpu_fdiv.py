"""f-divergence operators on a CUDA GPU: CUDA kernels, Triton and the float64 reference (skipped without one).

Large vocabularies (V = 128256, above the CUDA kernel's shared-memory row) and a small one (kept on
chip), every family, uniform / unit / tensor references, labels and probability targets.
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import generator

import fdistill
from fdistill import fdiv_reference as R
from fdistill._triton_dispatch import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
F_CASES = [
    ("kl", 1.5),
    ("reverse_kl", 1.5),
    ("alpha", 1.5),
    ("alpha", 2.0),
    ("alpha", 0.5),
    ("alpha", 3.0),
    ("js", 1.5),
]


def gpu_backends():
    names = []
    if fdistill.has_cuda_kernels():
        names.append("cuda")
    if triton_available():
        names.append("triton")
    return names


def gpu_logits(rows, vocab, seed, dtype=torch.float32):
    x = torch.randn(rows, vocab, generator=generator(seed)) * 3
    x[0, : vocab // 4] = -math.inf
    return x.to(dtype).to(CUDA)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("vocab", [4133, 128256])
@pytest.mark.parametrize("reference", ["uniform", "unit", "tensor"])
@pytest.mark.parametrize("case", F_CASES, ids=[f"{f}{a}" for f, a in F_CASES])
def test_softargmax_and_fy_loss_on_gpu(case, reference, vocab, backend, seed):
    f, alpha = case
    x = gpu_logits(3, vocab, seed).requires_grad_()
    q = (
        torch.rand(vocab, generator=generator(seed + 1)).add(0.05).to(CUDA)
        if reference == "tensor"
        else reference
    )
    q64 = q.double() if isinstance(q, torch.Tensor) else q
    p = fdistill.f_softargmax(x.detach(), f, alpha=alpha, reference=q, backend=backend)
    want = R.f_softargmax_reference(x.detach().double(), f, alpha=alpha, reference=q64)
    slack = 20 if f == "reverse_kl" else 1
    assert (p.double() - want).abs().max().item() <= 5e-5 * slack
    labels = torch.randint(vocab // 4, vocab, (3,), generator=generator(seed)).to(CUDA)
    loss = fdistill.fy_loss(x, labels, f, alpha=alpha, reference=q, reduction="sum", backend=backend)
    loss.backward()
    y = torch.nn.functional.one_hot(labels, vocab).double()
    want_loss = R.fy_loss_reference(x.detach().double(), y, f, alpha=alpha, reference=q64).sum()
    assert abs(loss.item() - want_loss.item()) <= 1e-4 * max(1.0, abs(want_loss.item())) * slack
    assert (x.grad.double() - (want - y)).abs().max().item() <= 5e-5 * slack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_and_triton_agree_on_half_inputs(dtype, seed):
    if len(gpu_backends()) < 2:
        pytest.skip("needs both the CUDA build and triton")
    x = gpu_logits(64, 128256, seed, dtype)
    p_cuda = fdistill.f_softargmax(x, backend="cuda")
    p_triton = fdistill.f_softargmax(x, backend="triton")
    assert torch.isfinite(p_cuda[1:]).all()
    torch.testing.assert_close(p_cuda.float(), p_triton.float(), rtol=2e-2, atol=1e-4)
    target = torch.softmax(torch.randn(64, 128256, device=CUDA), -1)
    target[0, : 128256 // 4] = 0
    target = target / target.sum(-1, keepdim=True)
    a = fdistill.fy_loss(x, target, reduction="none", backend="cuda")
    b = fdistill.fy_loss(x, target, reduction="none", backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", gpu_backends())
def test_special_rows_on_gpu(backend, seed):
    x = gpu_logits(4, 70000, seed)
    x[1] = -math.inf
    x[2, 5] = math.nan
    p = fdistill.f_softargmax(x, backend=backend)
    assert torch.all(p[1] == 0) and torch.isnan(p[2]).all() and torch.isfinite(p[3]).all()
    value = fdistill.f_softmax(x, backend=backend)
    assert value[1].item() == -math.inf and math.isnan(value[2].item())


def kl_softmax_closed_form(theta, q):
    """f_softmax(f="kl") in float64: p = q exp(theta - tau) with tau = LSE(theta + log q) gives
    D_f(p, q) = <p, theta> - tau - 1 + sum q: the value is LSE(theta + log q) + 1 - sum q (live entries)."""
    live = theta > -math.inf
    q = torch.where(live, q.expand_as(theta), torch.zeros_like(theta))
    return torch.logsumexp(theta + torch.log(q), -1) + 1 - q.sum(-1)


def strided_logits(rows, vocab, seed, dtype, layout):
    """gpu_logits, or the same values in a wider buffer at an offset of 3 (rows not 16-byte aligned)."""
    x = gpu_logits(rows, vocab, seed, dtype)
    if layout == "contiguous":
        return x
    buf = torch.zeros(rows, vocab + 8, dtype=dtype, device=x.device)
    buf[:, 3 : 3 + vocab] = x
    return buf[:, 3 : 3 + vocab]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "offset"])
@pytest.mark.parametrize("vocab", [4133, 128256])
@pytest.mark.parametrize("reference", ["uniform", "unit", "tensor"])
@pytest.mark.parametrize("case", F_CASES, ids=[f"{f}{a}" for f, a in F_CASES])
def test_f_softmax_values_on_gpu(case, reference, vocab, layout, dtype, backend, seed):
    """Each row's value against float64 (the reference module; KL in closed form too), its gradient p*."""
    f, alpha = case
    x = strided_logits(3, vocab, seed, dtype, layout).requires_grad_()
    q = torch.rand(vocab, generator=generator(seed + 1)).add(0.05) if reference == "tensor" else reference
    q = q.to(x.device) if isinstance(q, torch.Tensor) else q
    x64 = x.detach().double()
    q64 = q.double() if isinstance(q, torch.Tensor) else q
    value = fdistill.f_softmax(x, f, alpha=alpha, reference=q, backend=backend)
    p64 = R.f_softargmax_reference(x64, f, alpha=alpha, reference=q64)
    want = R.f_softmax_reference(x64, p64, f, alpha, q64)
    if f == "kl":
        q_full = R.reference_measure(q64, x64)
        torch.testing.assert_close(want, kl_softmax_closed_form(x64, q_full), rtol=1e-12, atol=1e-9)
    slack = 20 if f == "reverse_kl" else 1
    err = (value.double() - want).abs()
    assert (err <= 1e-5 * slack * want.abs().clamp(min=1)).all(), (value, want)
    value.sum().backward()
    rel = 5e-5 * slack if dtype == torch.float32 else 1e-2
    assert ((x.grad.double() - p64).abs() <= 5e-5 * slack + rel * p64).all()
