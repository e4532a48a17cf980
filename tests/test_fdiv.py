"""f-softargmax, f-softmax and FY losses: C++ kernel (and the API) against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from utils import generator, randn

import fdistill
from fdistill import fdiv_reference as R

# (f, alpha): every family, the alpha fast paths (1.5, 2) and the general alpha path on both sides
F_CASES = [("kl", 1.5), ("reverse_kl", 1.5), ("alpha", 1.5), ("alpha", 2.0), ("alpha", 0.5), ("alpha", 3.0),
           ("js", 1.5), ("hellinger", 1.5), ("chi2", 1.5)]  # fmt: skip
F_IDS = [f if f != "alpha" else f"alpha{a}" for f, a in F_CASES]
REFERENCES = ["uniform", "unit", "tensor"]


def logits_with_mask(shape, seed, dtype=torch.float32, scale=3.0, masked=True):
    """randn * scale with ties and, optionally, a block of -inf entries in the first row."""
    x = randn(shape, seed) * scale
    x[..., 5] = x[..., 7]  # a tie
    if masked:
        x.view(-1, shape[-1])[0, : shape[-1] // 3] = -math.inf
    return x.to(dtype)


def reference_for(kind, vocab, seed):
    if kind == "tensor":
        return torch.rand(vocab, generator=generator(seed + 1)) + 0.05
    return kind


def ref64(reference):
    return reference.double() if isinstance(reference, torch.Tensor) else reference


def p_tolerance(f, alpha, dtype):
    if dtype == torch.float64:
        return 1e-10
    if dtype in (torch.bfloat16, torch.float16):
        return 1e-2
    # fp32: tau is resolved to ~1e-7 relative; reverse KL's pole (p ~ q / (1 - x + tau)) amplifies it
    return 2e-4 if f == "reverse_kl" else 3e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("case", F_CASES, ids=F_IDS)
def test_softargmax_matches_reference(case, reference, dtype, seed):
    f, alpha = case
    x = logits_with_mask((3, 2, 1271), seed, dtype)
    q = reference_for(reference, 1271, seed)
    p = fdistill.f_softargmax(x, f, alpha=alpha, reference=q, backend="cpu")
    want = R.f_softargmax_reference(x.double(), f, alpha=alpha, reference=ref64(q))
    assert p.dtype == dtype and p.shape == x.shape
    err = (p.double() - want).abs().max().item()
    assert err <= p_tolerance(f, alpha, dtype), f"max |p - p_ref| = {err:.3e}"
    assert torch.all(p[0, 0, : 1271 // 3] == 0), "masked entries must get no mass"
    sums = p.double().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5 if dtype != torch.bfloat16 else 2e-2)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_reference_is_exact_entmax(alpha, dtype, seed):
    x = logits_with_mask((4, 37), seed, dtype, masked=False)
    p = fdistill.f_softargmax(x, "alpha", alpha=alpha, reference="unit", backend="cpu")
    want = R.entmax_exact(x.double(), alpha)
    assert (p.double() - want).abs().max().item() <= (1e-12 if dtype == torch.float64 else 2e-6)
    assert torch.equal(p == 0, want == 0), "the support must be the exact one"


def test_uniform_reference_is_entmax_at_temperature(seed):
    """alpha-softargmax with q = 1/V is alpha-entmax of V^(1 - alpha) theta (the documented temperature)."""
    vocab, alpha = 211, 1.5
    x = randn((3, vocab), seed, torch.float64) * 30
    p = fdistill.f_softargmax(x, "alpha", alpha=alpha, reference="uniform", backend="cpu")
    want = R.entmax_exact(x * vocab ** (1 - alpha), alpha)
    assert (p - want).abs().max().item() <= 1e-12


def test_kl_uniform_is_softmax_and_its_fy_loss_is_kl(seed):
    x = logits_with_mask((5, 1271), seed, masked=False).double()
    p = fdistill.f_softargmax(x, "kl", backend="cpu")
    torch.testing.assert_close(p, torch.softmax(x, -1), rtol=0, atol=1e-14)
    value = fdistill.f_softmax(x, "kl", backend="cpu")
    torch.testing.assert_close(value, torch.logsumexp(x, -1) - math.log(1271), rtol=0, atol=1e-10)
    y = torch.softmax(randn((5, 1271), seed + 2, torch.float64), -1)
    loss = fdistill.fy_loss(x, y, "kl", reduction="none", backend="cpu")
    kl = (y * (y.log() - torch.log_softmax(x, -1))).sum(-1)
    torch.testing.assert_close(loss, kl, rtol=0, atol=1e-10)
    labels = torch.randint(0, 1271, (5,), generator=generator(seed))
    ce = torch.nn.functional.cross_entropy(x, labels, reduction="none")
    torch.testing.assert_close(fdistill.fy_loss(x, labels, "kl", reduction="none", backend="cpu"), ce)


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("case", F_CASES, ids=F_IDS)
def test_f_softmax_matches_reference(case, reference, seed):
    f, alpha = case
    x = logits_with_mask((4, 1271), seed)
    q = reference_for(reference, 1271, seed)
    value = fdistill.f_softmax(x, f, alpha=alpha, reference=q, backend="cpu")
    x64 = x.double()
    p = R.f_softargmax_reference(x64, f, alpha=alpha, reference=ref64(q))
    want = R.f_softmax_reference(x64, p, f, alpha, ref64(q))
    scale = max(1.0, want.abs().max().item())
    assert (value.double() - want).abs().max().item() <= 2e-6 * scale * (10 if f == "reverse_kl" else 1)


@pytest.mark.parametrize("target_kind", ["labels", "probs", "sparse_probs"])
@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("case", F_CASES, ids=F_IDS)
def test_fy_loss_and_gradient_match_reference(case, reference, target_kind, seed):
    f, alpha = case
    vocab, temperature = 1271, 1.7
    x = logits_with_mask((2, 3, vocab), seed).requires_grad_()
    q = reference_for(reference, vocab, seed)
    live = x.detach() > -math.inf
    if target_kind == "labels":
        target = torch.randint(vocab // 3, vocab, (2, 3), generator=generator(seed))  # on live entries
        target[1, 2] = -100
        y = torch.nn.functional.one_hot(target.clamp_min(0), vocab).double()
        y[1, 2] = 0
    else:
        y = torch.rand((2, 3, vocab), generator=generator(seed + 3), dtype=torch.float64) * live
        if target_kind == "sparse_probs":
            y = y * (y > 0.8)  # zeros in y: D_f(y, q) uses f(0)
        y = y / y.sum(-1, keepdim=True)
        target = y.float()
    loss = fdistill.fy_loss(x, target, f, alpha=alpha, reference=q, temperature=temperature,
                            reduction="none", backend="cpu")  # fmt: skip
    weight = torch.rand((2, 3), generator=generator(seed + 4))
    (loss * weight).sum().backward()

    theta = x.detach().double() / temperature
    want = R.fy_loss_reference(theta, y, f, alpha=alpha, reference=ref64(q))
    p = R.f_softargmax_reference(theta, f, alpha=alpha, reference=ref64(q))
    want_grad = (p - y) * weight.double()[..., None] / temperature
    if target_kind == "labels":
        want[1, 2] = 0
        want_grad[1, 2] = 0
    scale = max(1.0, want.abs().max().item())
    slack = 10 if f == "reverse_kl" else 1
    assert (loss.double() - want).abs().max().item() <= 3e-6 * scale * slack
    assert (x.grad.double() - want_grad).abs().max().item() <= 3e-5 * slack


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fy_reductions_and_ignore_index(reduction, seed):
    x = logits_with_mask((4, 5, 97), seed, masked=False)
    labels = torch.randint(0, 97, (4, 5), generator=generator(seed))
    labels[0] = -1
    rows = fdistill.fy_loss(x, labels, ignore_index=-1, reduction="none", backend="cpu")
    assert torch.all(rows[0] == 0)
    got = fdistill.fy_loss(x, labels, ignore_index=-1, reduction=reduction, backend="cpu")
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / 15}[reduction]
    torch.testing.assert_close(got, want)
    all_ignored = torch.full((4, 5), -1)
    xg = x.clone().requires_grad_()
    loss = fdistill.fy_loss(xg, all_ignored, ignore_index=-1, backend="cpu")
    loss.backward()
    assert loss.item() == 0 and torch.all(xg.grad == 0)


GRADCHECK_CASES = [
    ("alpha", 1.5),
    ("alpha", 2.0),
    ("kl", 1.5),
    ("js", 1.5),
    ("reverse_kl", 1.5),
    ("alpha", 0.7),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_float64(case, seed):
    f, alpha = case
    x = randn((3, 23), seed, torch.float64).requires_grad_()
    q = torch.rand(23, generator=generator(seed), dtype=torch.float64) + 0.1
    y = torch.softmax(randn((3, 23), seed + 1, torch.float64), -1)
    opts = dict(alpha=alpha, reference=q, backend="cpu")
    assert torch.autograd.gradcheck(lambda t: fdistill.f_softargmax(t, f, **opts), (x,), atol=1e-7)
    assert torch.autograd.gradcheck(lambda t: fdistill.f_softmax(t, f, **opts), (x,), atol=1e-7)
    assert torch.autograd.gradcheck(
        lambda t: fdistill.fy_loss(t, y, f, reduction="none", temperature=0.8, **opts), (x,), atol=1e-7
    )


def test_softargmax_backward_matches_reference_autograd_along_dim(seed):
    """The Jacobian product (any dim) against the closed-form J = diag(w) - w w^T / sum w."""
    x = randn((23, 4), seed, torch.float64).requires_grad_()
    g = randn((23, 4), seed + 1, torch.float64)
    p = fdistill.f_softargmax(x, "alpha", alpha=1.5, reference="unit", dim=0, backend="cpu")
    (p * g).sum().backward()
    pr = R.entmax_exact(x.detach().t(), 1.5).t()
    w = pr.sqrt()  # alpha = 1.5, unit reference: w = p^(2 - alpha)
    want = w * (g - (w * g).sum(0) / w.sum(0))
    torch.testing.assert_close(x.grad, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_special_rows(dtype, seed):
    x = logits_with_mask((4, 64), seed, dtype, masked=False)
    x[1] = -math.inf
    x[2, 3] = math.nan
    x[3, 9] = math.inf
    p = fdistill.f_softargmax(x, backend="cpu")
    assert torch.all(p[1] == 0) and torch.isnan(p[2]).all() and torch.isnan(p[3]).all()
    assert torch.isfinite(p[0]).all()
    value = fdistill.f_softmax(x, backend="cpu")
    assert value[1].item() == -math.inf and math.isnan(value[2].item()) and math.isfinite(value[0].item())
    xg = x.float().clone().requires_grad_()
    labels = torch.tensor([1, 2, 3, 4])
    loss = fdistill.fy_loss(xg, labels, reduction="none", backend="cpu")
    loss.sum().backward()
    assert loss[1].item() == 0 and torch.all(xg.grad[1] == 0)
    assert math.isnan(loss[2].item()) and torch.isnan(xg.grad[2]).all()
    assert math.isfinite(loss[0].item()) and torch.isfinite(xg.grad[0]).all()


def test_target_mass_on_masked_entry_is_infinite(seed):
    x = logits_with_mask((2, 50), seed)
    labels = torch.tensor([0, 3])  # row 0, entry 0 is masked
    loss = fdistill.fy_loss(x, labels, reduction="none", backend="cpu")
    assert loss[0].item() == math.inf and math.isfinite(loss[1].item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_at_large_logits_are_solved_in_fp32(dtype, seed):
    x = (randn((3, 1271), seed) * 3000).clamp(-6e4, 6e4).to(dtype)
    for f, alpha in [("alpha", 1.5), ("js", 1.5), ("reverse_kl", 1.5)]:
        p = fdistill.f_softargmax(x, f, alpha=alpha, backend="cpu")
        want = R.f_softargmax_reference(x.double(), f, alpha=alpha)
        assert torch.isfinite(p).all()
        assert (p.double() - want).abs().max().item() <= 1e-2


def test_large_vocabulary_loss_has_no_cancellation(seed):
    """V = 256k: the FY loss per entry stays accurate (one-hot and soft targets)."""
    vocab = 262144
    x = randn((2, vocab), seed) * 4
    y = torch.softmax(randn((2, vocab), seed + 1, torch.float64) * 4, -1)
    labels = torch.tensor([5, vocab - 1])
    for target, y64 in [
        (y.float(), y.float().double()),
        (labels, torch.nn.functional.one_hot(labels, vocab).double()),
    ]:
        loss = fdistill.fy_loss(x, target, "alpha", alpha=1.5, reduction="none", backend="cpu")
        want = R.fy_loss_reference(x.double(), y64, "alpha", alpha=1.5)
        assert (loss.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_n_iter_bounds_the_sweeps_and_output_stays_normalised(seed):
    x = logits_with_mask((4, 300), seed, masked=False)
    rough = fdistill.f_softargmax(x, "alpha", alpha=3.0, n_iter=1, backend="cpu")
    sums = rough.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    exact = fdistill.f_softargmax(x, "alpha", alpha=3.0, backend="cpu")
    assert (rough - exact).abs().max().item() > 1e-4, "one sweep cannot have converged: n_iter is ignored"


def test_reference_backend_agrees_with_cpu(seed):
    x = logits_with_mask((3, 101), seed)
    labels = torch.randint(40, 101, (3,), generator=generator(seed))
    for f, alpha in F_CASES:
        a = fdistill.fy_loss(x, labels, f, alpha=alpha, backend="reference", reduction="none")
        b = fdistill.fy_loss(x, labels, f, alpha=alpha, backend="cpu", reduction="none")
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_module_and_compile(seed, fresh_dynamo):
    x = logits_with_mask((2, 3, 64), seed, masked=False).requires_grad_()
    labels = torch.randint(0, 64, (2, 3), generator=generator(seed))
    module = fdistill.FYLoss("alpha", alpha=1.5, reduction="sum")
    eager = module(x, labels)
    compiled = torch.compile(lambda t: fdistill.fy_loss(t, labels, "alpha", reduction="sum"), fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    assert "f='alpha'" in repr(module)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(mode, dtype, seed):
    x = logits_with_mask((3, 40), seed, dtype, masked=False)
    labels = torch.tensor([1, 2, 3]) if mode == 1 else None
    args = (x, None, None, labels, "alpha", 1.5, 1 / 40, 1.3, -100, 100, 1e-7, mode)
    torch.library.opcheck(torch.ops.fdistill.fdiv_fwd.default, args)
    if mode:
        _, stats = torch.ops.fdistill.fdiv_fwd(*args)
        bwd = (
            torch.rand(3, dtype=dtype),
            x,
            None,
            None,
            labels,
            stats,
            "alpha",
            1.5,
            1 / 40,
            1.3,
            -100,
            mode,
        )
        torch.library.opcheck(torch.ops.fdistill.fdiv_bwd.default, bwd)


BAD_CALLS = [
    (dict(f="tsallis"), ValueError, "f must be one of"),
    (dict(alpha=1.0), ValueError, "alpha must be > 0"),
    (dict(alpha=-0.5), ValueError, "alpha must be > 0"),
    (dict(alpha=math.nan), ValueError, "alpha must be finite"),
    (dict(reference="gaussian"), ValueError, "reference must be one of"),
    (dict(reference=-torch.ones(16)), ValueError, "positive and finite"),
    (dict(reference=torch.ones(15)), ValueError, "does not broadcast"),
    (dict(reference=torch.ones(16, dtype=torch.long)), TypeError, "floating tensor"),
    (dict(reference=[1.0] * 16), TypeError, "reference must be"),
    (dict(dim=2), ValueError, "dim must be"),
    (dict(n_iter=0), ValueError, "n_iter"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_CALLS, ids=[str(c[0]) for c in BAD_CALLS])
def test_bad_operator_arguments(kwargs, error, match):
    x = torch.randn(3, 16)
    kwargs = dict(kwargs)
    f = kwargs.pop("f", "alpha")
    with pytest.raises(error, match=match):
        fdistill.f_softargmax(x, f, **kwargs)
    if "dim" not in kwargs:  # fy_loss takes the vocabulary as the last dimension
        with pytest.raises(error, match=match):
            fdistill.fy_loss(x, torch.zeros(3, dtype=torch.long), f, **kwargs)


def test_bad_targets():
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="labels must be in"):
        fdistill.fy_loss(x, torch.tensor([0, 16, 1]))
    with pytest.raises(ValueError, match="labels"):
        fdistill.fy_loss(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="sum to 1"):
        fdistill.fy_loss(x, torch.rand(3, 16))
    with pytest.raises(ValueError, match="non-negative"):
        fdistill.fy_loss(x, torch.softmax(torch.randn(3, 16), -1) - 0.01)
    with pytest.raises(ValueError, match="logits' shape"):
        fdistill.fy_loss(x, torch.softmax(torch.randn(3, 15), -1))
    with pytest.raises(TypeError, match="target must be"):
        fdistill.fy_loss(x, [0, 1, 2])
    with pytest.raises(TypeError, match="logits must be"):
        fdistill.f_softargmax(torch.zeros(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fdistill.fy_loss(x, torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="requires grad"):
        fdistill.fy_loss(x, torch.softmax(torch.randn(3, 16), -1).requires_grad_())


@pytest.mark.skipif(
    not (torch.cuda.is_available() or fdistill._triton_dispatch.interpreter_enabled()), reason="needs triton"
)
@pytest.mark.parametrize("case", [("alpha", 1.5), ("js", 1.5), ("kl", 1.5)], ids=str)
def test_public_api_on_triton_backend_agrees_with_cpu(case, seed):
    f, alpha = case
    x = logits_with_mask((3, 211), seed)
    labels = torch.randint(211 // 3, 211, (3,), generator=generator(seed))
    results = {}
    for backend in ("cpu", "triton"):
        xg = x.clone().requires_grad_()
        loss = fdistill.fy_loss(xg, labels, f, alpha=alpha, temperature=1.3, backend=backend)
        loss.backward()
        p = fdistill.f_softargmax(x, f, alpha=alpha, backend=backend)
        value = fdistill.f_softmax(x, f, alpha=alpha, backend=backend)
        results[backend] = (loss, xg.grad, p, value)
    for a, b in zip(results["cpu"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
