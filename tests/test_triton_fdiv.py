"""The Triton f-softargmax / FY-loss ops (``fdiv_fwd_triton``, ``fdiv_bwd_triton``) against the
float64 pure-PyTorch reference (fdistill/fdiv_reference.py).

The ops are called directly through ``torch.ops`` with the C++ schema of ``fdiv_fwd`` / ``fdiv_bwd``.
Without a GPU they run on CPU tensors under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1), so shapes are kept small; on CUDA the float32 tolerances get ``SLACK``
(approximate exp / log). Masked (-inf) entries are outside the simplex: a row with masked entries is
checked against the reference on its unmasked entries alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import ON_CUDA, SKIP_WITHOUT_TRITON, TRITON_DEVICE, TRITON_INTERPRETER_WARNINGS, generator

import fdistill
from fdistill.fdiv_reference import (
    entmax_exact,
    f_softargmax_reference,
    f_softmax_reference,
    fy_loss_reference,
    reference_measure,
)

DEVICE = TRITON_DEVICE
SLACK = 10.0 if ON_CUDA else 1.0

pytestmark = [SKIP_WITHOUT_TRITON, *TRITON_INTERPRETER_WARNINGS]

F_CASES = [
    ("kl", 1.0),
    ("reverse_kl", 1.0),
    ("alpha", 1.5),
    ("alpha", 2.0),
    ("alpha", 0.5),
    ("alpha", 3.0),
    ("js", 1.0),
]
F_IDS = ["kl", "rkl", "a1.5", "a2", "a0.5", "a3", "js"]
REFERENCES = ["uniform", "unit", "tensor"]
TOL = 1e-6  # the solver's |S0 - 1| tolerance (float32 runs)
P_ATOL = 1e-5 * SLACK


@pytest.fixture(scope="module")
def ops():
    from fdistill.triton.fdiv import fdiv_backward_op, fdiv_forward_op

    return fdiv_forward_op(), fdiv_backward_op()


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_theta(rows, vocab, seed, dtype=torch.float32, scale=3.0, neg_inf_frac=0.0):
    """Logits in ``dtype`` (drawn in float64); about ``neg_inf_frac`` entries -inf (never a whole row)."""
    g = generator(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    if neg_inf_frac > 0:
        mask = torch.rand(rows, vocab, generator=g) < neg_inf_frac
        mask[:, 0] = False
        x = x.masked_fill(mask, -math.inf)
    return x.to(DEVICE, dtype)


def make_reference(kind, rows, vocab, seed, acc, shared=True):
    """(reference tensor or None, reference_value, the reference's q for the float64 oracle)."""
    if kind == "uniform":
        return None, 1.0 / vocab, "uniform"
    if kind == "unit":
        return None, 1.0, "unit"
    g = generator(seed + 7)
    q = (torch.rand(1 if shared else rows, vocab, generator=g, dtype=torch.float64) * 2 + 0.05) / vocab
    q_dev = q.to(DEVICE, acc)
    if shared:
        q_dev = q_dev.expand(rows, vocab)  # row stride 0
    return q_dev, 1.0, q_dev.double().cpu()


def make_probs(rows, vocab, seed, theta=None, sparse=False):
    """A teacher distribution (float64): softmax of random logits, zero where theta is -inf;
    ``sparse`` keeps the top 5 entries only (exact zeros, as top-k distillation)."""
    g = generator(seed + 3)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    if theta is not None:
        z = z.masked_fill(torch.isneginf(theta.double().cpu()), -math.inf)
    if sparse:
        kth = z.topk(min(5, vocab), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, -math.inf)
    return torch.softmax(z, -1)


def call_fwd(ops, logits, mode, f, alpha, ref, ref_value, *, target=None, labels=None, T=1.0,
             ignore_index=-100, max_sweeps=100, tol=TOL):  # fmt: skip
    fwd, _ = ops
    return fwd(logits, ref, target, labels, f, alpha, ref_value, T, ignore_index, max_sweeps, tol, mode)


def call_bwd(ops, grad_rows, logits, stats, mode, f, alpha, ref, ref_value, *, target=None, labels=None,
             T=1.0, ignore_index=-100):  # fmt: skip
    _, bwd = ops
    return bwd(grad_rows, logits, ref, target, labels, stats, f, alpha, ref_value, T, ignore_index, mode)


# ----------------------------------------------------------------------------- float64 oracle
# (fdiv_reference masks -inf entries: outside the simplex and left out of every sum)


def oracle_p(theta64, f, alpha, q_ref):
    return f_softargmax_reference(theta64, f, alpha=alpha, reference=q_ref, n_iter=200)


def oracle_fy(theta64, y64, f, alpha, q_ref):
    """FY loss (D_f(y, q) dropped for reverse KL, +inf for target mass on a -inf entry)."""
    return fy_loss_reference(theta64, y64, f, alpha=alpha, reference=q_ref, n_iter=200)


def oracle_value(theta64, f, alpha, q_ref):
    """f-softmax value <p*, theta> - D_f(p*, q) from the reference p*."""
    return f_softmax_reference(theta64, oracle_p(theta64, f, alpha, q_ref), f, alpha, q_ref)


def p_atol(p_ref, f, alpha, q_ref):
    """Per-entry tolerance on p in float32: 1e-5, plus the conditioning of (f*)' near its pole.

    Reverse KL, JS and alpha < 1 have a pole at the edge of the domain of (f*)', and a peaked row
    puts its argmax there: p_j = q_j (f*)'(x_j - tau) then moves by p_j kappa_j dv for a change dv
    of v = x - tau, kappa = d log (f*)'/dv = p/q (reverse KL), 1 + p/q (JS), (p/q)^(1 - alpha)
    (alpha < 1). v and tau are float32 (the stats hold tau in the accumulation dtype), so dv is
    ~eps32 and the S0 of the search cannot get closer to 1 than ~eps32 max(p kappa): every p of the
    row moves by that much through the renormalisation.
    """
    p = p_ref.double().cpu()
    if isinstance(q_ref, str):
        q = torch.full_like(p, 1.0 / p.shape[-1] if q_ref == "uniform" else 1.0)
    else:
        q = q_ref.double().cpu().expand_as(p)
    u = p / q
    if f == "reverse_kl":
        kappa = u
    elif f == "js":
        kappa = 1 + u
    elif f == "alpha" and alpha < 1:
        kappa = u.pow(1 - alpha)
    else:
        kappa = torch.zeros_like(u)
    cond = (p * kappa).amax(-1, keepdim=True) * torch.finfo(torch.float32).eps
    return P_ATOL + SLACK * cond


def assert_close(actual, expected, atol, rtol=0.0, name="tensor"):
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    same_nonfinite = (a.isnan() == e.isnan()).all() and (a.isposinf() == e.isposinf()).all()
    same_nonfinite = same_nonfinite and (a.isneginf() == e.isneginf()).all()
    assert same_nonfinite, f"{name}: NaN / inf at different places:\n{a}\n{e}"
    fin = torch.isfinite(e)
    err = (a[fin] - e[fin]).abs()
    allowed = (torch.as_tensor(atol, dtype=torch.float64) + rtol * e.abs()).expand_as(e)[fin]
    if err.numel():
        worst = (err - allowed).argmax()
        assert (err <= allowed).all(), (
            f"{name}: max abs err {err.max().item():.3g} "
            f"(allowed {allowed[worst].item():.3g} at {worst.item()}; "
            f"got {a[fin][worst].item():.10g}, want {e[fin][worst].item():.10g})"
        )


# ----------------------------------------------------------------------------- mode 0: p*


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize(("f", "alpha"), F_CASES, ids=F_IDS)
def test_softargmax_matches_reference(ops, f, alpha, reference, seed):
    rows, vocab, T = 3, 1271, 1.5
    logits = make_theta(rows, vocab, seed)
    ref, ref_value, q_ref = make_reference(reference, rows, vocab, seed, torch.float32)
    p, stats = call_fwd(ops, logits, 0, f, alpha, ref, ref_value, T=T)
    assert p.dtype == torch.float32 and p.shape == (rows, vocab)
    assert stats.dtype == torch.float32 and stats.shape == (rows, 3)
    theta64 = logits.double().cpu() / T
    want = oracle_p(theta64, f, alpha, q_ref)
    assert_close(p, want, p_atol(want, f, alpha, q_ref), name="p")
    assert_close(p.double().sum(-1), torch.ones(rows, dtype=torch.float64), 1e-5, name="sum p")
    assert_close(stats[:, 0], theta64.amax(-1), 1e-6, 1e-6, name="max theta")
    if f == "kl":  # closed form: tau = 0, S0 = sum q exp(x)
        assert (stats[:, 1] == 0).all()
        q = reference_measure(q_ref, theta64)
        s0 = (q * torch.exp(theta64 - theta64.amax(-1, keepdim=True))).sum(-1)
        assert_close(stats[:, 2], s0, 0, 1e-6, name="S0")
    elif f == "alpha" and alpha > 1:  # no pole: the search meets the tolerance
        assert ((stats[:, 2].double() - 1).abs() <= 10 * TOL).all(), stats
    else:  # near a pole S0 moves in steps of ~eps32 max(p kappa) (see p_atol)
        assert ((stats[:, 2].double() - 1).abs() <= 1e-3).all(), stats


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_unit_reference_is_entmax(ops, alpha, seed):
    """With q = 1 the alpha-softargmax is alpha-entmax (exact by sorting); V = 37, T = 0.7."""
    logits = make_theta(4, 37, seed)
    p, _ = call_fwd(ops, logits, 0, "alpha", alpha, None, 1.0, T=0.7)
    theta64 = logits.double().cpu() / 0.7
    # entmax_exact: alpha = 2 is sparsemax(theta); alpha = 1.5 is [theta/2 - tau]_+^2 = (f*)'(theta - tau')
    assert_close(p, entmax_exact(theta64, alpha), P_ATOL, name="p vs entmax")
    assert ((p == 0).sum() > 0).item()  # sparse


def test_kl_uniform_is_softmax(ops, seed):
    logits = make_theta(4, 1271, seed, scale=5.0)
    p, stats = call_fwd(ops, logits, 0, "kl", 1.0, None, 1 / 1271, T=2.0)
    assert_close(p, torch.softmax(logits.double().cpu() / 2.0, -1), 1e-6, 1e-5, name="p")
    assert (stats[:, 1] == 0).all()


@pytest.mark.parametrize(("f", "alpha"), F_CASES, ids=F_IDS)
def test_softargmax_masked_entries_and_reference_rows(ops, f, alpha, seed):
    """-inf entries get p = 0 exactly and leave the rest a softargmax of the unmasked entries (with
    their own q); a per-row reference tensor; V = 37 (one 64-entry tile, 27 lanes off the row)."""
    rows, vocab = 4, 37
    logits = make_theta(rows, vocab, seed, neg_inf_frac=0.3)
    ref, ref_value, q_ref = make_reference("tensor", rows, vocab, seed, torch.float32, shared=False)
    p, stats = call_fwd(ops, logits, 0, f, alpha, ref, ref_value)
    masked = torch.isneginf(logits)
    assert (p[masked] == 0).all()
    want = oracle_p(logits.double().cpu(), f, alpha, q_ref)
    assert_close(p, want, p_atol(want, f, alpha, q_ref), name="p")
    # uniform q keeps 1/V on the unmasked entries
    p, _ = call_fwd(ops, logits, 0, f, alpha, None, 1 / vocab)
    want = oracle_p(logits.double().cpu(), f, alpha, "uniform")
    assert_close(p, want, p_atol(want, f, alpha, "uniform"), name="p uniform")


@pytest.mark.parametrize(
    ("f", "alpha"), [("alpha", 1.5), ("reverse_kl", 1.0), ("js", 1.0)], ids=["a1.5", "rkl", "js"]
)
def test_multi_tile_row_and_row_stride(ops, f, alpha, seed):
    """V = 4133: a 4096-entry tile and a mostly empty one; rows of a wider tensor (row stride 4200)."""
    base = make_theta(2, 4200, seed, scale=4.0)
    logits = base[:, 30:4163]
    p, _ = call_fwd(ops, logits, 0, f, alpha, None, 1 / 4133, T=1.3)
    want = oracle_p(logits.double().cpu() / 1.3, f, alpha, "uniform")
    assert_close(p, want, p_atol(want, f, alpha, "uniform"), name="p")


def test_bfloat16_and_float64_logits(ops, seed):
    """bf16 logits compute in float32 (p rounded to bf16); float64 logits compute in float64."""
    logits = make_theta(3, 1271, seed, dtype=torch.bfloat16)
    theta64 = logits.double().cpu() / 0.9
    for f, alpha in [("alpha", 1.5), ("reverse_kl", 1.0), ("alpha", 0.5)]:
        p, stats = call_fwd(ops, logits, 0, f, alpha, None, 1 / 1271, T=0.9)
        assert p.dtype == torch.bfloat16 and stats.dtype == torch.float32
        want = oracle_p(theta64, f, alpha, "uniform")
        # bf16 keeps 8 significant bits; the interpreter rounds toward zero: 1 ulp
        assert_close(p, want, p_atol(want, f, alpha, "uniform"), 2**-7, name=f"p bf16 {f}")
        loss, _ = call_fwd(
            ops, logits, 1, f, alpha, None, 1 / 1271, labels=torch.arange(3, device=DEVICE), T=0.9
        )
        y = torch.nn.functional.one_hot(torch.arange(3), 1271).double()
        assert_close(loss, oracle_fy(theta64, y, f, alpha, "uniform"), 1e-4, 1e-5, name=f"loss bf16 {f}")
    logits = make_theta(3, 1271, seed, dtype=torch.float64)
    q = (torch.rand(1, 1271, generator=generator(seed), dtype=torch.float64) + 0.1).to(DEVICE)
    for f, alpha in [("alpha", 1.5), ("js", 1.0), ("alpha", 3.0), ("kl", 1.0)]:
        p, stats = call_fwd(ops, logits, 0, f, alpha, q.expand(3, 1271), 1.0, tol=1e-13)
        assert p.dtype == torch.float64 and stats.dtype == torch.float64
        assert_close(p, oracle_p(logits.cpu(), f, alpha, q.cpu()), 1e-11, name=f"p f64 {f}")


# ----------------------------------------------------------------------------- mode 1: FY loss


@pytest.mark.parametrize("target_kind", ["labels", "probs", "sparse_probs"])
@pytest.mark.parametrize(("f", "alpha"), F_CASES, ids=F_IDS)
def test_fy_loss_and_gradient(ops, f, alpha, target_kind, seed):
    rows, vocab, T = 5, 37, 1.7
    logits = make_theta(rows, vocab, seed)
    theta64 = logits.double().cpu() / T
    kind = "tensor" if target_kind == "probs" else "uniform"
    ref, ref_value, q_ref = make_reference(kind, rows, vocab, seed, torch.float32)
    if target_kind == "labels":
        labels = torch.randint(0, vocab, (rows,), generator=generator(seed)).to(DEVICE)
        labels[1] = -100
        labels[3] = 7
        target = None
        y64 = torch.nn.functional.one_hot(labels.clamp(min=0).cpu(), vocab).double()
        y64[1] = 0
    else:
        labels = None
        y64 = make_probs(rows, vocab, seed, sparse=target_kind == "sparse_probs")
        target = y64.to(DEVICE, torch.float32)
        y64 = target.double().cpu()
    loss, stats = call_fwd(ops, logits, 1, f, alpha, ref, ref_value, target=target, labels=labels, T=T)
    assert loss.dtype == torch.float32 and loss.shape == (rows,)
    want = oracle_fy(theta64, y64, f, alpha, q_ref)
    if labels is not None:
        want[1] = 0.0
        assert loss[1] == 0 and stats[1].tolist() == [0.0, 0.0, 1.0]
    assert_close(loss, want, 2e-5 * SLACK, 2e-5 * SLACK, name="loss")
    if f != "reverse_kl":  # FY losses are >= 0 (not without D_f(y, q))
        assert (loss[torch.arange(rows) != 1] > -1e-5).all()

    grad_rows = torch.randn(rows, generator=generator(seed + 11)).to(DEVICE)
    grad = call_bwd(
        ops, grad_rows, logits, stats, 1, f, alpha, ref, ref_value, target=target, labels=labels, T=T
    )
    assert grad.dtype == torch.float32 and grad.shape == (rows, vocab)
    p = oracle_p(theta64, f, alpha, q_ref)
    scale = grad_rows.double().cpu()[:, None] / T
    want_grad = scale * (p - y64)
    if labels is not None:
        want_grad[1] = 0.0
        assert (grad[1] == 0).all()
    assert_close(grad, want_grad, p_atol(p, f, alpha, q_ref) * scale.abs().clamp(min=1), name="grad")


def test_fy_loss_is_kl_for_kl_uniform(ops, seed):
    """KL generator, uniform q: the FY loss is KL(y || softmax(theta)), gradient softmax - y."""
    logits = make_theta(4, 1271, seed)
    y = make_probs(4, 1271, seed)
    loss, stats = call_fwd(ops, logits, 1, "kl", 1.0, None, 1 / 1271, target=y.to(DEVICE, torch.float32))
    y32 = y.float().double()
    log_q = torch.log_softmax(logits.double().cpu(), -1)
    want = (torch.special.xlogy(y32, y32) - y32 * log_q).sum(-1)
    assert_close(loss, want, 1e-5, 1e-5, name="loss")


@pytest.mark.parametrize(("f", "alpha"), F_CASES, ids=F_IDS)
def test_fy_loss_masked_entries(ops, f, alpha, seed):
    """Masked entries add nothing when y = 0 there; +inf when the target puts mass there (a label
    or a probability); the gradient stays finite: grad_rows / T (p - y) with p = 0 there."""
    rows, vocab = 4, 37
    logits = make_theta(rows, vocab, seed, neg_inf_frac=0.3)
    theta64 = logits.double().cpu()
    y = make_probs(rows, vocab, seed, theta=logits)
    loss, stats = call_fwd(ops, logits, 1, f, alpha, None, 1 / vocab, target=y.to(DEVICE, torch.float32))
    assert_close(loss, oracle_fy(theta64, y.float().double(), f, alpha, "uniform"), 2e-5, 2e-5, name="loss")
    masked_col = int(torch.isneginf(logits[2]).nonzero()[0])
    labels = torch.tensor([0, 0, masked_col, -100], device=DEVICE)
    loss, stats = call_fwd(ops, logits, 1, f, alpha, None, 1 / vocab, labels=labels)
    assert loss[2] == math.inf and torch.isfinite(loss[:2]).all() and loss[3] == 0
    grad = call_bwd(
        ops, torch.ones(rows, device=DEVICE), logits, stats, 1, f, alpha, None, 1 / vocab, labels=labels
    )
    assert grad[2, masked_col] == -1 and torch.isfinite(grad).all() and (grad[3] == 0).all()
    y_bad = y.clone()
    y_bad[1, int(torch.isneginf(logits[1]).nonzero()[0])] = 0.25
    loss, _ = call_fwd(ops, logits, 1, f, alpha, None, 1 / vocab, target=y_bad.to(DEVICE, torch.float32))
    assert loss[1] == math.inf and torch.isfinite(loss[[0, 2, 3]]).all()


# ----------------------------------------------------------------------------- mode 2: f-softmax value


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize(("f", "alpha"), F_CASES, ids=F_IDS)
def test_softmax_value_and_gradient(ops, f, alpha, reference, seed):
    rows, vocab, T = 3, 37, 0.8
    logits = make_theta(rows, vocab, seed, neg_inf_frac=0.2 if reference != "tensor" else 0.0)
    theta64 = logits.double().cpu() / T
    ref, ref_value, q_ref = make_reference(reference, rows, vocab, seed, torch.float32)
    value, stats = call_fwd(ops, logits, 2, f, alpha, ref, ref_value, T=T)
    assert value.dtype == torch.float32 and value.shape == (rows,)
    want = oracle_value(theta64, f, alpha, q_ref)
    assert_close(value, want, 2e-5 * SLACK, 2e-6 * SLACK, name="value")
    grad_rows = torch.randn(rows, generator=generator(seed + 5)).to(DEVICE)
    grad = call_bwd(ops, grad_rows, logits, stats, 2, f, alpha, ref, ref_value, T=T)
    p = oracle_p(theta64, f, alpha, q_ref)
    scale = grad_rows.double().cpu()[:, None] / T
    assert_close(grad, scale * p, p_atol(p, f, alpha, q_ref) * scale.abs().clamp(min=1), name="grad")


def test_softmax_value_is_logsumexp_for_kl(ops, seed):
    """KL with unit q: D_f(p, 1) = sum (p log p - p + 1) = -H(p) - 1 + V, so
    softmax_f(theta) = max_p <p, theta> + H(p) + 1 - V = LSE(theta) + 1 - V."""
    vocab = 1271
    logits = make_theta(3, vocab, seed)
    value, _ = call_fwd(ops, logits, 2, "kl", 1.0, None, 1.0)
    want = torch.logsumexp(logits.double().cpu(), -1) + 1 - vocab
    assert_close(value, want, 1e-4, 1e-6, name="value")


# ----------------------------------------------------------------------------- special rows


@pytest.mark.parametrize(("f", "alpha"), [("kl", 1.0), ("alpha", 1.5), ("reverse_kl", 1.0), ("alpha", 0.5)],
                         ids=["kl", "a1.5", "rkl", "a0.5"])  # fmt: skip
def test_special_rows(ops, f, alpha, seed):
    """Row 0 all -inf: p = 0, loss 0, value -inf, gradient 0, stats [-inf, 0, 1]. Row 1 a NaN, row 2
    a +inf logit: NaN everywhere. Row 3 normal (unaffected)."""
    vocab = 37
    logits = make_theta(4, vocab, seed)
    logits[0] = -math.inf
    logits[1, 5] = math.nan
    logits[2, 9] = math.inf
    y = make_probs(4, vocab, seed).to(DEVICE, torch.float32)
    labels = torch.tensor([3, 4, 5, 6], device=DEVICE)
    p, stats = call_fwd(ops, logits, 0, f, alpha, None, 1 / vocab)
    assert (p[0] == 0).all() and p[1:3].isnan().all() and torch.isfinite(p[3]).all()
    assert stats[0].tolist() == [-math.inf, 0.0, 1.0]
    for mode, kw in [(1, {"target": y}), (1, {"labels": labels}), (2, {})]:
        out, stats = call_fwd(ops, logits, mode, f, alpha, None, 1 / vocab, **kw)
        assert out[0] == (0.0 if mode == 1 else -math.inf), out
        assert out[1:3].isnan().all() and torch.isfinite(out[3])
        assert stats[0].tolist() == [-math.inf, 0.0, 1.0]
        grad = call_bwd(
            ops, torch.ones(4, device=DEVICE), logits, stats, mode, f, alpha, None, 1 / vocab, **kw
        )
        assert (grad[0] == 0).all() and grad[1:3].isnan().all() and torch.isfinite(grad[3]).all()


def test_single_entry_rows(ops):
    """One unmasked entry (or V = 1): p = 1 there, zero loss against it, value = its logit."""
    logits = torch.tensor([[2.0, -math.inf, -math.inf], [-math.inf, -math.inf, -3.0]], device=DEVICE)
    for f, alpha in F_CASES:
        p, _ = call_fwd(ops, logits, 0, f, alpha, None, 1 / 3)
        assert_close(p, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), 1e-6, name=f"p {f}{alpha}")
        loss, _ = call_fwd(ops, logits, 1, f, alpha, None, 1.0, labels=torch.tensor([0, 2], device=DEVICE))
        assert_close(loss, torch.zeros(2), 1e-6, name=f"loss {f}{alpha}")
    p, _ = call_fwd(ops, torch.full((2, 1), 3.0, device=DEVICE), 0, "alpha", 1.5, None, 1.0)
    assert (p == 1).all()


# ----------------------------------------------------------------------------- solver and contract


@pytest.mark.parametrize(("f", "alpha"), F_CASES[1:], ids=F_IDS[1:])
def test_stats_reproduce_p_for_any_sweep_budget(ops, f, alpha, seed):
    """After any number of sweeps p is renormalised by the S0 of the stats, and the backward
    recomputes exactly the forward's p from them: grad (mode 2, grad_rows = T) == p (mode 0)."""
    logits = make_theta(3, 37, seed, scale=4.0)
    for sweeps in (1, 2, 100):
        p, stats = call_fwd(ops, logits, 0, f, alpha, None, 1 / 37, T=1.25, max_sweeps=sweeps)
        assert_close(p.double().sum(-1), torch.ones(3, dtype=torch.float64), 1e-5, name="sum p")
        _, stats2 = call_fwd(ops, logits, 2, f, alpha, None, 1 / 37, T=1.25, max_sweeps=sweeps)
        assert torch.equal(stats, stats2)
        grad = call_bwd(
            ops, torch.full((3,), 1.25, device=DEVICE), logits, stats, 2, f, alpha, None, 1 / 37, T=1.25
        )
        assert torch.equal(grad, p)
    # the search stops on a small Newton step too: S0 within ~eps32 max(p kappa) of 1 (see p_atol)
    assert (stats[:, 2] - 1).abs().max() <= (TOL if f == "alpha" and alpha > 1 else 1e-3)


def test_tolerance_zero_terminates(ops, seed):
    """tol = 0: the search stops when the bracket stops shrinking (or after max_sweeps)."""
    logits = make_theta(2, 37, seed)
    for f, alpha in F_CASES:
        p, _ = call_fwd(ops, logits, 0, f, alpha, None, 1 / 37, tol=0.0)
        want = oracle_p(logits.double().cpu(), f, alpha, "uniform")
        assert_close(p, want, p_atol(want, f, alpha, "uniform"), name=f"p {f}")


def test_rows_zero_and_errors(ops):
    fwd, bwd = ops
    empty = torch.zeros(0, 11, device=DEVICE)
    out, stats = call_fwd(ops, empty, 0, "alpha", 1.5, None, 1.0)
    assert out.shape == (0, 11) and stats.shape == (0, 3)
    logits = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="unknown f"):
        call_fwd(ops, logits, 0, "tsallis", 1.5, None, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        call_fwd(ops, logits, 0, "alpha", 1.0, None, 1.0)
    with pytest.raises(ValueError, match="mode 1"):
        call_fwd(ops, logits, 1, "alpha", 1.5, None, 1.0)
    with pytest.raises(ValueError, match="mode"):
        call_fwd(ops, logits, 3, "alpha", 1.5, None, 1.0)
    with pytest.raises(TypeError, match="reference"):
        call_fwd(ops, logits, 0, "alpha", 1.5, torch.ones(2, 5, dtype=torch.float64, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="modes 1, 2"):
        call_bwd(
            ops,
            torch.ones(2, device=DEVICE),
            logits,
            torch.zeros(2, 3, device=DEVICE),
            0,
            "kl",
            1.0,
            None,
            1.0,
        )


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_opcheck(ops, mode, seed):
    """Schema, fake (meta) kernels and dispatch of both ops."""
    fwd, bwd = ops
    logits = make_theta(4, 37, seed)
    labels = torch.tensor([1, -100, 3, 36], device=DEVICE) if mode == 1 else None
    ref = torch.rand(1, 37, generator=generator(seed)).add(0.1).to(DEVICE).expand(4, 37)
    args = (logits, ref, None, labels, "alpha", 1.5, 1.0, 1.3, -100, 50, 1e-6, mode)
    torch.library.opcheck(fwd.default, args)
    if mode:
        _, stats = fwd(*args)
        bargs = (
            torch.randn(4).to(DEVICE),
            logits,
            ref,
            None,
            labels,
            stats,
            "alpha",
            1.5,
            1.0,
            1.3,
            -100,
            mode,
        )
        torch.library.opcheck(bwd.default, bargs)


@pytest.mark.skipif(not fdistill.has_cpu_kernels(), reason="the C++ extension is not built")
@pytest.mark.parametrize(("f", "alpha"), F_CASES, ids=F_IDS)
def test_agrees_with_cpu_kernel(ops, f, alpha, seed):
    """The same op contract as torch.ops.fdistill.fdiv_fwd / fdiv_bwd (CPU): the same special rows
    (masked entries, all -inf, NaN, +inf, an ignored and an out-of-range label), the same max in the
    stats, outputs and gradients equal up to float32 rounding (and the conditioning of p_atol)."""
    rows, vocab = 6, 1271
    logits = make_theta(rows, vocab, seed, scale=4.0).cpu()
    logits[1, ::3] = -math.inf
    logits[2] = -math.inf
    logits[3, 5] = math.nan
    logits[4, 7] = math.inf
    y = make_probs(rows, vocab, seed, theta=logits).float()
    labels = torch.tensor([1, 2, 3, -100, 4, vocab])  # -100 ignored, vocab out of range (NaN)
    grad_rows = torch.randn(rows, generator=generator(seed + 1))
    for mode, target, lab in [(0, None, None), (1, y, None), (1, None, labels), (2, None, None)]:
        args = (None, target, lab, f, alpha, 1 / vocab, 1.3, -100, 100, TOL, mode)
        out, stats = call_fwd(ops, logits.to(DEVICE), mode, f, alpha, None, 1 / vocab, target=target,
                              labels=lab, T=1.3)  # fmt: skip
        out_cpu, stats_cpu = torch.ops.fdistill.fdiv_fwd(logits, *args)
        assert torch.equal(stats[:, 0].cpu().nan_to_num(), stats_cpu[:, 0].nan_to_num())
        assert_close(stats, stats_cpu, 1e-5, 1e-3, name="stats")  # tau, S0 of searches stopped apart
        if mode == 0:
            tol_p = 2 * p_atol(out_cpu.double().nan_to_num(), f, alpha, "uniform")
            assert_close(out, out_cpu, tol_p, name="p vs CPU")
            continue
        assert_close(out, out_cpu, 1e-5, 2e-6, name=f"mode {mode} vs CPU")
        bargs = (grad_rows, logits, None, target, lab, stats_cpu, f, alpha, 1 / vocab, 1.3, -100, mode)
        grad_cpu = torch.ops.fdistill.fdiv_bwd(*bargs)
        grad = call_bwd(ops, grad_rows.to(DEVICE), logits.to(DEVICE), stats_cpu.to(DEVICE), mode, f, alpha,
                        None, 1 / vocab, target=target, labels=lab, T=1.3)  # fmt: skip
        # float32 exp / log differ by an ulp, amplified near a pole as in p_atol
        tol_g = tol_p * (grad_rows.double()[:, None] / 1.3).abs()
        assert_close(grad, grad_cpu, tol_g, 1e-5, name=f"grad mode {mode} vs CPU (same stats)")
