"""The pure-PyTorch reference against independent closed forms, in float64.

Everything else is tested against the reference, so the reference is checked here against formulas
written from scratch (docs/divergences.md#divergences), against TRL's generalized_jsd_loss as it is
written in TRL, and against finite differences.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from utils import DIVERGENCE_CASES, assert_close_verbose, case_id, make_logits, param_of

from fdistill.reference import divergence_rows_reference as ref

TOL = {"atol": 1e-12, "rtol": 1e-10}


@pytest.fixture
def st(seed):
    return make_logits((6, 257), torch.float64, scale=2.0, seed=seed)


def _kl(a, b):
    """KL(a || b) of probability rows, naively (all entries positive here)."""
    return (a * (a.log() - b.log())).sum(-1)


def _probs(s, t, temperature=1.0):
    return torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)  # q (student), p (teacher)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_kl_is_kl_div(st, temperature):
    s, t = st
    want = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    assert_close_verbose(ref(s, t, "forward_kl", 0.0, temperature), want, **TOL, name="forward_kl")


def test_reverse_kl_is_kl_div_swapped(st):
    s, t = st
    want = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)
    assert_close_verbose(ref(s, t, "reverse_kl", 0.0), want, **TOL, name="reverse_kl")


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jeffreys_mixes_the_two_kls(st, beta):
    s, t = st
    q, p = _probs(s, t)
    assert_close_verbose(
        ref(s, t, "jeffreys", beta), (1 - beta) * _kl(p, q) + beta * _kl(q, p), **TOL, name="jeffreys"
    )


def test_jsd_half_is_symmetric_and_naive(st):
    s, t = st
    q, p = _probs(s, t)
    m = 0.5 * (p + q)
    got = ref(s, t, "jsd", 0.5)
    assert_close_verbose(got, 0.5 * _kl(p, m) + 0.5 * _kl(q, m), **TOL, name="jsd naive")
    assert_close_verbose(ref(t, s, "jsd", 0.5), got, **TOL, name="jsd symmetric")
    assert (got <= math.log(2) + 1e-12).all()


def _trl_generalized_jsd_loss(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss (per token, no reduction), as written in TRL."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    return jsd.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl(st, beta):
    s, t = st
    assert_close_verbose(
        ref(s, t, "jsd", beta, 1.7), _trl_generalized_jsd_loss(s, t, beta, 1.7), **TOL, name="jsd"
    )


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 1.0])
def test_skew_kls(st, lam):
    s, t = st
    q, p = _probs(s, t)
    assert_close_verbose(ref(s, t, "skew_kl", lam), _kl(p, lam * p + (1 - lam) * q), **TOL, name="skew_kl")
    assert_close_verbose(
        ref(s, t, "skew_reverse_kl", lam), _kl(q, lam * q + (1 - lam) * p), **TOL, name="skew_reverse_kl"
    )


def test_tv(st):
    s, t = st
    q, p = _probs(s, t)
    assert_close_verbose(ref(s, t, "tv", 0.0), 0.5 * (p - q).abs().sum(-1), **TOL, name="tv")


@pytest.mark.parametrize("alpha", [-0.5, 0.5, 1.5, 3.0])
def test_alpha_naive(st, alpha):
    s, t = st
    q, p = _probs(s, t)
    want = (1 - (p**alpha * q ** (1 - alpha)).sum(-1)) / (alpha * (1 - alpha))
    assert_close_verbose(ref(s, t, "alpha", alpha), want, atol=1e-12, rtol=1e-9, name="alpha")


def test_alpha_half_is_twice_squared_hellinger(st):
    """(1 - A) / (a (1 - a)) at a = 1/2 is 4 (1 - sum sqrt(p q)) = 2 sum (sqrt p - sqrt q)^2."""
    s, t = st
    q, p = _probs(s, t)
    got = ref(s, t, "alpha", 0.5)
    assert_close_verbose(got, 4 * (1 - (p * q).sqrt().sum(-1)), **TOL, name="4 (1 - BC)")
    assert_close_verbose(got, 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1), **TOL, name="2 H^2")


def test_alpha_limits_are_the_kls(st):
    s, t = st
    assert_close_verbose(ref(s, t, "alpha", 1 - 1e-6), ref(s, t, "forward_kl", 0.0), 1e-6, 1e-4, "alpha -> 1")
    assert_close_verbose(ref(s, t, "alpha", 1e-6), ref(s, t, "reverse_kl", 0.0), 1e-6, 1e-4, "alpha -> 0")


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=[case_id(c) for c in DIVERGENCE_CASES])
def test_divergences_are_nonnegative_and_zero_on_equal_inputs(st, case):
    divergence, options = case
    s, t = st
    param = param_of(divergence, options)
    assert (ref(s, t, divergence, param) >= -1e-12).all()
    assert_close_verbose(ref(s, s.clone(), divergence, param), torch.zeros(6), 1e-12, 0, "D(q, q)")


def test_temperature_divides_both_logits(st):
    s, t = st
    for divergence in ("forward_kl", "jsd", "alpha"):
        assert_close_verbose(
            ref(s, t, divergence, 0.3, 2.5), ref(s / 2.5, t / 2.5, divergence, 0.3), **TOL, name="T"
        )


def test_low_precision_inputs_compute_in_float32(st):
    s, t = st
    got = ref(s.bfloat16(), t.bfloat16(), "jsd", 0.3)
    assert got.dtype == torch.float32
    want = ref(s.bfloat16().double(), t.bfloat16().double(), "jsd", 0.3)
    assert_close_verbose(got, want, 1e-5, 1e-5, "bf16")


def test_special_rows(seed):
    s, t = make_logits((5, 20), torch.float64, seed=seed)
    s[0], t[0] = -math.inf, -math.inf
    s[1] = -math.inf
    t[2, 3] = math.nan
    s[3, :5], t[3, :5] = -math.inf, -math.inf
    t[4, :5] = -math.inf
    for divergence in ("forward_kl", "jsd", "tv", "alpha"):
        rows = ref(s, t, divergence, 0.5)
        assert rows[0] == 0 and rows[1].isnan() and rows[2].isnan(), divergence
        assert_close_verbose(rows[3:4], ref(s[3:4, 5:], t[3:4, 5:], divergence, 0.5), **TOL, name="masked")
        assert torch.isfinite(rows[4])  # teacher-only -inf: forward KL and the bounded ones are finite
    assert ref(s[4:], t[4:], "reverse_kl").isposinf().all()


# ----------------------------------------------------------------------------- gradients


def _closed_form_grad(s, t, divergence, param, temperature=1.0):
    """dL/ds from the table of docs/divergences.md#gradients, per row."""
    s, t = s / temperature, t / temperature
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    q, p = ls.exp(), lt.exp()

    def through_softmax(g):  # dL/ds_j = q_j (g_j - sum_i q_i g_i)
        return q * (g - (q * g).sum(-1, keepdim=True))

    def rkl_grad():
        return q * (ls - lt - (q * (ls - lt)).sum(-1, keepdim=True))

    if divergence == "forward_kl":
        g = q - p
    elif divergence == "reverse_kl":
        g = rkl_grad()
    elif divergence == "jeffreys":
        g = (1 - param) * (q - p) + param * rkl_grad()
    elif divergence == "jsd":
        lm = torch.log(param * p + (1 - param) * q)
        g = (1 - param) * q * (ls - lm - (q * (ls - lm)).sum(-1, keepdim=True))
    elif divergence == "skew_kl":
        r = p / (param * p + (1 - param) * q)
        g = -(1 - param) * q * (r - (q * r).sum(-1, keepdim=True))
    elif divergence == "skew_reverse_kl":
        m = param * q + (1 - param) * p
        g = through_softmax((q / m).log() + 1 - param * q / m)
    elif divergence == "tv":
        g = 0.5 * through_softmax(torch.sign(q - p))
    elif divergence == "alpha":
        big_a = (p**param * q ** (1 - param)).sum(-1, keepdim=True)
        r = torch.softmax(param * t + (1 - param) * s, -1)
        g = (big_a / param) * (q - r)
    else:
        raise AssertionError(divergence)
    return g / temperature


_GRAD_CASES = [c for c in DIVERGENCE_CASES if not (c[0] == "jsd" and c[1]["beta"] in (0.0, 1.0))]


@pytest.mark.parametrize("case", _GRAD_CASES, ids=[case_id(c) for c in _GRAD_CASES])
def test_gradient_table_matches_autograd_of_reference(case, seed):
    divergence, options = case
    param = param_of(divergence, options)
    s, t = make_logits((5, 131), torch.float64, scale=1.5, seed=seed)
    s.requires_grad_(True)
    rows = ref(s, t, divergence, param, 1.7)
    if rows.requires_grad:
        (got,) = torch.autograd.grad(rows.sum(), s)
    else:  # skew_kl at lambda = 1 is KL(p || p) = 0
        got = torch.zeros_like(s)
    want = _closed_form_grad(s.detach(), t, divergence, param, 1.7)
    assert_close_verbose(
        got, want, 1e-12 * max(1.0, want.abs().max().item()), 1e-9, f"{case_id(case)} gradient"
    )


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=[case_id(c) for c in DIVERGENCE_CASES])
def test_reference_gradcheck(case, seed):
    divergence, options = case
    param = param_of(divergence, options)
    s, t = make_logits((3, 11), torch.float64, scale=1.0, seed=seed, neg_inf_frac=0.15)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ref(a, b, divergence, param, 1.3), (s, t), eps=1e-6, atol=1e-8
    )


def test_gradient_at_padding_rows_is_zero(seed):
    s, t = make_logits((3, 9), torch.float64, seed=seed)
    s[1], t[1] = -math.inf, -math.inf
    for divergence in ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv", "alpha"):
        a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        ref(a, b, divergence, 0.4).sum().backward()
        assert (a.grad[1] == 0).all() and (b.grad[1] == 0).all(), divergence
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all(), divergence
