"""fdistill.compat against the peers' own formulas, written here in float64 from their documented
semantics (Liger-Kernel, TRL, torchtune are never imported), on values and gradients; and the
conventions a user switching from a peer hits, each measured against fdistill's core."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F
from utils import SKIP_WITHOUT_TRITON, TRITON_DEVICE, TRITON_INTERPRETER_WARNINGS

import fdistill
from fdistill import compat
from fdistill.compat._common import teacher_entropy_rows

V = 37  # odd vocabulary sizes throughout
IGN = -100
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors


def _close(actual, expected, tol=1e-5):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def _leaf(x, dtype=torch.float32):
    return x.detach().to(dtype).requires_grad_()


def _grads(fn, *leaves, weight=None):
    """``fn()``'s value and the gradients of ``sum(value * weight)`` (weight 1 for a scalar)."""
    out = fn()
    w = torch.ones_like(out) if weight is None else weight.to(out.dtype)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    return out.detach(), grads


def _labels(n, vocab=V, ignored=(1, 4)):
    lab = torch.randint(0, vocab, (n,))
    lab[list(ignored)] = IGN
    return lab


def _kept_count(labels, n):
    return n if labels is None else int((labels != IGN).sum())


# ----------------------------------------------------------------------------- reference formulas (float64)


def ref_liger_jsd_elem(x, y, beta):
    """Liger's pointwise generalized JSD of log-probabilities x = log Q (input), y = log P (target)."""
    p, q = y.exp(), x.exp()
    if beta == 0:
        return p * (y - x)
    if beta == 1:
        return q * (x - y)
    m = beta * p + (1 - beta) * q
    return beta * p * y + (1 - beta) * q * x - m * m.log()


def ref_masked_mean(rows, labels, ignore_index=IGN):
    """Rows zeroed where ignored, summed, divided by the kept count (0 when none)."""
    if labels is None:
        return rows.sum() / rows.shape[0]
    keep = labels != ignore_index
    return torch.where(keep, rows, torch.zeros_like(rows)).sum() / max(int(keep.sum()), 1)


def ref_jsd_of_logits(s, t, beta, temperature):
    """TRL's / Liger's generalized JSD per token of logits, both divided by the temperature."""
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    return ref_liger_jsd_elem(log_q, log_p, beta)


# ----------------------------------------------------------------------------- Liger: JSD


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("normalised", [True, False], ids=["logprobs", "unnormalised"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_liger_jsd(beta, normalised, with_labels):
    n = 6
    s, t = torch.randn(n, V) * 2, torch.randn(n, V) * 2
    if normalised:
        s, t = s.log_softmax(-1), t.log_softmax(-1)
    else:  # Liger computes pointwise: no renormalisation
        s, t = s * 0.3 - 3.0, t * 0.3 - 3.5
    labels = _labels(n) if with_labels else None
    x = _leaf(s)
    got, (gx,) = _grads(lambda: compat.LigerJSD(beta=beta)(x, t, labels), x)
    x64 = _leaf(s, F64)
    ref = ref_liger_jsd_elem
    want, (wx,) = _grads(lambda: ref_masked_mean(ref(x64, t.double(), beta).sum(-1), labels), x64)
    _close(got, want)
    _close(gx, wx)  # Liger's pointwise gradient w.r.t. log q, not the softmax-projected one
    assert got.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_liger_jsd_low_precision_log_probs_take_the_fused_path(dtype, monkeypatch):
    n = 6
    lq = torch.randn(n, V * 9).log_softmax(-1).to(dtype)
    lp = torch.randn(n, V * 9).log_softmax(-1).to(dtype)
    monkeypatch.setattr(compat.liger, "_jsd_pointwise", None)  # the unfused fallback is not called
    x = _leaf(lq, dtype)
    got, (gx,) = _grads(lambda: compat.liger_jsd(x, lp, beta=0.3), x)
    x64 = _leaf(lq, F64)
    want, (wx,) = _grads(lambda: ref_liger_jsd_elem(x64, lp.double(), 0.3).sum() / n, x64)
    assert got.dtype == dtype and gx.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(gx.double(), wx, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("normalised", [True, False], ids=["logprobs", "unnormalised"])
def test_liger_jsd_ignored_rows_may_hold_nan(beta, normalised):
    n = 5
    s, t = torch.randn(n, V).log_softmax(-1), torch.randn(n, V).log_softmax(-1)
    if not normalised:
        s = s + 0.2
    labels = _labels(n, ignored=(1, 3))
    s_nan, t_nan = s.clone(), t.clone()
    s_nan[1], t_nan[3] = float("nan"), float("nan")
    x, x_clean = _leaf(s_nan), _leaf(s)
    got, (gx,) = _grads(lambda: compat.liger_jsd(x, t_nan, labels, beta), x)
    want, (wx,) = _grads(lambda: compat.liger_jsd(x_clean, t, labels, beta), x_clean)
    _close(got, want)
    _close(gx, wx)
    assert (gx[[1, 3]] == 0).all()


def test_liger_jsd_conventions():
    n = 5
    logits_s, logits_t = torch.randn(n, V), torch.randn(n, V)
    labels = _labels(n, ignored=(2,))
    # takes log-probs where fdistill takes logits: same value and logit gradients through log_softmax
    z = _leaf(logits_s)
    got, (gz,) = _grads(lambda: compat.liger_jsd(z.log_softmax(-1), logits_t.log_softmax(-1), labels, 0.4), z)
    z2 = _leaf(logits_s)
    core, (cz,) = _grads(lambda: fdistill.divergence_loss(z2, logits_t, "jsd", beta=0.4, labels=labels), z2)
    _close(got, core)
    _close(gz, cz)
    # on raw logits Liger's pointwise formula is not fdistill's renormalised divergence
    pointwise = compat.liger_jsd(logits_s, logits_t, beta=0.4)
    renormalised = fdistill.divergence_loss(logits_s, logits_t, "jsd", beta=0.4)
    assert not torch.allclose(pointwise, renormalised, rtol=1e-2)
    # the input dtype comes back (fdistill: float32)
    lq, lp = logits_s.log_softmax(-1).bfloat16(), logits_t.log_softmax(-1).bfloat16()
    assert compat.liger_jsd(lq, lp).dtype == torch.bfloat16
    assert fdistill.divergence_loss(lq, lp, "jsd").dtype == torch.float32
    # a teacher that requires grad is detached silently (fdistill raises)
    lp_grad = logits_t.log_softmax(-1).detach().requires_grad_()
    x = _leaf(logits_s.log_softmax(-1))
    compat.liger_jsd(x, lp_grad).backward()
    assert lp_grad.grad is None and x.grad is not None
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        fdistill.divergence_loss(x, lp_grad)
    # mixed dtypes promote (fdistill raises)
    lq32, lp64 = logits_s.log_softmax(-1), logits_t.double().log_softmax(-1)
    want = ref_masked_mean(ref_liger_jsd_elem(lq32.double(), lp64, 0.5).sum(-1), None)
    _close(compat.liger_jsd(lq32, lp64), want)
    with pytest.raises(TypeError, match="same dtype"):
        fdistill.divergence_loss(lq32, lp64)
    # every token ignored: 0
    assert compat.liger_jsd(lq32, lp64.float(), torch.full((n,), IGN)).item() == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_liger_jsd_masked_vocabulary_contributes_zero(beta):
    z, t = torch.randn(4, V), torch.randn(4, V)
    z[:, :5] = t[:, :5] = float("-inf")
    x = _leaf(z.log_softmax(-1))
    got, (gx,) = _grads(lambda: compat.liger_jsd(x, t.log_softmax(-1), beta=beta), x)
    kept = slice(5, None)  # the formula on the unmasked entries (Liger's own gives NaN at 0 * -inf)
    x64 = _leaf(z[:, kept].log_softmax(-1), F64)
    lp64 = t[:, kept].double().log_softmax(-1)
    want, (wx,) = _grads(lambda: ref_liger_jsd_elem(x64, lp64, beta).sum() / 4, x64)
    _close(got, want)
    _close(gx[:, kept], wx)
    assert (gx[:, :5] == 0).all()


# ----------------------------------------------------------------------------- Liger: KL divergence


def ref_kl_div(x, target, reduction, log_target):
    """torch.nn.KLDivLoss's pointwise ``target (log target - input)`` (0 where target = 0) and reductions."""
    elem = target.exp() * (target - x) if log_target else torch.special.xlogy(target, target) - target * x
    if reduction == "none":
        return elem
    if reduction == "sum":
        return elem.sum()
    return elem.sum() / (x.shape[0] * (x.shape[1] if reduction == "mean" else 1))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("normalised", [True, False], ids=["logprobs", "unnormalised"])
def test_liger_kl_div(reduction, log_target, normalised):
    n = 5
    s, t = torch.randn(n, V).log_softmax(-1), torch.randn(n, V).log_softmax(-1)
    if not normalised:
        s, t = s + 0.7, t - 0.4
    target = t if log_target else t.exp()
    if not log_target:
        target[0, :5] = 0.0  # zero probabilities contribute 0
        target[3] = 0.0  # an all-zero target row (padding) is 0
    x = _leaf(s)
    weight = torch.rand(n, V) if reduction == "none" else None
    loss_fn = compat.LigerKLDIVLoss(reduction=reduction, log_target=log_target)
    got, (gx,) = _grads(lambda: loss_fn(x, target), x, weight=weight)
    x64 = _leaf(s, F64)
    want, (wx,) = _grads(lambda: ref_kl_div(x64, target.double(), reduction, log_target), x64, weight=weight)
    _close(got, want)
    _close(gx, wx)
    assert got.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_liger_kl_div_conventions():
    n = 4
    logits_s, logits_t = torch.randn(n, V), torch.randn(n, V)
    lq, p = logits_s.log_softmax(-1), logits_t.softmax(-1)
    batchmean = compat.liger_kl_div(lq, p, reduction="batchmean")
    # batchmean is fdistill's mean; torch's / Liger's mean divides by tokens x V
    _close(batchmean, fdistill.divergence_loss(logits_s, logits_t, "forward_kl"))
    _close(compat.liger_kl_div(lq, p, reduction="mean"), batchmean / V)
    assert compat.LigerKLDIVLoss().reduction == "mean"  # nn.KLDivLoss's default
    # none is elementwise there, per token in fdistill
    assert compat.liger_kl_div(lq, p, reduction="none").shape == (n, V)
    assert fdistill.divergence_loss(logits_s, logits_t, reduction="none").shape == (n,)
    # the same numbers as torch's own kl_div
    for reduction in ("none", "sum", "mean", "batchmean"):
        _close(compat.liger_kl_div(lq, p, reduction=reduction), F.kl_div(lq, p, reduction=reduction))
    # eps is Liger's first positional argument
    assert compat.LigerKLDIVLoss(1e-8, reduction="sum").eps == 1e-8


# ----------------------------------------------------------------------------- Liger: TVD


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_liger_tvd(reduction, with_labels):
    n = 6
    p, q = torch.randn(n, V).softmax(-1), torch.randn(n, V).softmax(-1)
    p[0, :4] = q[0, :4]  # ties: Liger's subgradient is -1/2 there
    labels = _labels(n) if with_labels else None
    x = _leaf(p)
    weight = torch.rand(n, V) if reduction == "none" else None
    got, (gx,) = _grads(lambda: compat.LigerTVDLoss(reduction=reduction)(x, q, labels), x, weight=weight)
    elem = 0.5 * (p.double() - q.double()).abs()
    grad = torch.where(p > q, 0.5, -0.5).double()
    keep = torch.ones(n, 1, dtype=torch.bool) if labels is None else (labels != IGN).unsqueeze(-1)
    elem, grad = elem * keep, grad * keep
    kept = _kept_count(labels, n)
    scale = {"none": 1.0, "sum": 1.0, "mean": 1.0 / (kept * V), "batchmean": 1.0 / kept}[reduction]
    want = elem if reduction == "none" else elem.sum() * scale
    _close(got, want)
    _close(gx, grad * scale * (weight if weight is not None else 1.0))
    assert got.dtype == torch.float32


def test_liger_tvd_all_ignored_is_zero():
    p, q = torch.randn(3, V).softmax(-1), torch.randn(3, V).softmax(-1)
    assert compat.liger_tvd(p, q, torch.full((3,), IGN), reduction="batchmean").item() == 0.0


# ----------------------------------------------------------------------------- Liger: fused linear JSD


def _heads(n=7, h_s=8, h_t=6, vocab=V, vocab_t=None, bias=False):
    g = torch.Generator().manual_seed(n * 31 + vocab)
    x = torch.randn(n, h_s, generator=g)
    w = torch.randn(vocab, h_s, generator=g) / h_s**0.5 * 3
    xt = torch.randn(n, h_t, generator=g)
    wt = torch.randn(vocab_t or vocab, h_t, generator=g) / h_t**0.5 * 3
    b = torch.randn(vocab, generator=g) if bias else None
    bt = torch.randn(vocab_t or vocab, generator=g) if bias else None
    return x, w, xt, wt, b, bt


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_liger_fused_linear_jsd(beta, temperature, with_labels):
    x, w, xt, wt, _, _ = _heads()
    labels = _labels(x.shape[0]) if with_labels else None
    xl, wl = _leaf(x), _leaf(w)
    wt_grad = wt.clone().requires_grad_()  # a teacher that requires grad is detached silently
    module = compat.LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)
    got, (gx, gw) = _grads(lambda: module(xl, wl, xt, wt_grad, labels), xl, wl)
    assert wt_grad.grad is None
    x64, w64 = _leaf(x, F64), _leaf(w, F64)

    def ref():  # both heads divided by the temperature, no T^2
        rows = ref_jsd_of_logits(x64 @ w64.T, xt.double() @ wt.double().T, beta, temperature).sum(-1)
        return ref_masked_mean(rows, labels)

    want, (wx, ww) = _grads(ref, x64, w64)
    _close(got, want)
    _close(gx, wx)
    _close(gw, ww)
    assert got.dtype == torch.float32


# ----------------------------------------------------------------------------- Liger: chunked JSD loss


@pytest.mark.parametrize(
    "w_hard,w_soft", [(0.5, 0.5), (0.3, 0.7), (0.0, 1.0), (1.0, 0.0)], ids=["half", "mix", "soft", "hard"]
)
@pytest.mark.parametrize("vocab_t", [V, V + 4], ids=["samevocab", "teacherpadded"])
@pytest.mark.parametrize("parts", [False, True], ids=["loss", "parts"])
def test_liger_fused_linear_jsd_loss(w_hard, w_soft, vocab_t, parts):
    beta, temperature = 0.3, 2.0
    x, w, xt, wt, b, bt = _heads(vocab_t=vocab_t, bias=True)
    labels = _labels(x.shape[0])
    leaves = _leaf(x), _leaf(w), _leaf(b)
    module = compat.LigerFusedLinearJSDLoss(w_hard, w_soft, beta=beta, temperature=temperature,
                                            chunk_size=3, return_soft_hard_loss=parts)  # fmt: skip
    wt_grad = wt.clone().requires_grad_()  # detached silently, as in Liger
    out = module(leaves[0], leaves[1], xt, wt_grad, labels, leaves[2], bt)
    loss = out[0] if parts else out
    got_grads = torch.autograd.grad(loss, leaves)
    assert wt_grad.grad is None
    x64, w64, b64 = (_leaf(t, F64) for t in (x, w, b))

    def ref_parts():
        z = x64 @ w64.T + b64
        hard = F.cross_entropy(z, labels, ignore_index=IGN, reduction="sum") / int((labels != IGN).sum())
        zt = xt.double() @ wt.double().T + bt.double()
        z_pad = F.pad(z, (0, zt.shape[1] - z.shape[1]))  # Liger pads the student's logits with zeros
        soft = ref_masked_mean(ref_jsd_of_logits(z_pad, zt, beta, temperature).sum(-1), labels)
        return w_hard * hard + w_soft * soft, soft, hard

    want = ref_parts()
    want_grads = torch.autograd.grad(want[0], (x64, w64, b64))
    if parts:
        for g, r in zip(out, want, strict=True):
            _close(g.detach(), r.detach())
    else:
        _close(loss.detach(), want[0].detach())
    for g, r in zip(got_grads, want_grads, strict=True):
        _close(g, r)
    assert loss.dtype == torch.float32


def test_liger_fused_linear_low_precision_returns_float32():
    x, w, xt, wt, _, _ = _heads()
    args = [t.bfloat16() for t in (x, w, xt, wt)]
    assert compat.liger_fused_linear_jsd(*args).dtype == torch.float32
    assert compat.liger_fused_linear_jsd_loss(*args, _labels(x.shape[0])).dtype == torch.float32


def test_liger_fused_linear_jsd_loss_is_the_mix_of_ce_and_jsd():
    x, w, xt, wt, _, _ = _heads()
    labels = _labels(x.shape[0])
    loss, soft, hard = compat.liger_fused_linear_jsd_loss(
        x, w, xt, wt, labels, weight_hard_loss=0.25, weight_soft_loss=0.75, return_soft_hard_loss=True
    )
    _close(loss, 0.25 * hard + 0.75 * soft)
    # fdistill's hard_loss_weight adds CE to the divergence (no soft weight): the same mix, scaled
    core = fdistill.fused_linear_divergence_loss(x, w, teacher_hidden=xt, teacher_weight=wt, divergence="jsd",
                                                 labels=labels, hard_loss_weight=0.25 / 0.75)  # fmt: skip
    _close(loss, 0.75 * core)


def test_liger_fused_kl_tempering_only_the_student_translates():
    """Liger's fused-linear KL against given teacher probabilities tempers only the student: in fdistill,
    pass ``teacher_logits = T * log(target)`` so that dividing by T gives back the target."""
    x, w, _, _, _, _ = _heads()
    temperature = 2.0
    target = torch.randn(x.shape[0], V).softmax(-1)
    xl = _leaf(x)
    got, (gx,) = _grads(lambda: fdistill.fused_linear_divergence_loss(
        xl, w, teacher_logits=temperature * target.log(), temperature=temperature), xl)  # fmt: skip
    x64 = _leaf(x, F64)

    def ref():  # batchmean KL(target || softmax(z / T))
        log_q = F.log_softmax(x64 @ w.double().T / temperature, -1)
        return (target.double() * (target.double().log() - log_q)).sum() / x.shape[0]

    want, (wx,) = _grads(ref, x64)
    _close(got, want)
    _close(gx, wx)


# ----------------------------------------------------------------------------- TRL


def ref_trl(s, t, labels, beta, temperature, reduction, num_items=None):
    elem = ref_jsd_of_logits(s, t, beta, temperature)
    if labels is not None:
        mask = labels != IGN
        elem = elem[mask]
    if num_items is not None:
        return elem.sum() / num_items
    if reduction == "batchmean":
        return elem.sum() / (max(int(mask.sum()), 1) if labels is not None else s.shape[0])
    if reduction == "sum":
        return elem.sum()
    if reduction == "mean":
        return elem.mean()
    return elem


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_trl_generalized_jsd_loss(beta, temperature, reduction, with_labels):
    B, T = 2, 4
    s, t = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    labels = _labels(B * T).reshape(B, T) if with_labels else None
    xs = _leaf(s)
    got = compat.generalized_jsd_loss(xs, t, labels, beta=beta, temperature=temperature, reduction=reduction)
    weight = torch.rand(got.shape)
    (gs,) = torch.autograd.grad((got * weight).sum(), xs)
    s64 = _leaf(s, F64)
    want = ref_trl(s64, t.double(), labels, beta, temperature, reduction)
    (ws,) = torch.autograd.grad((want * weight.double()).sum(), s64)
    _close(got.detach(), want.detach())
    _close(gs, ws)


def test_trl_conventions():
    B, T = 3, 5
    s, t = torch.randn(B, T, V), torch.randn(B, T, V)
    # batchmean without labels divides by B, fdistill's mean by B x T
    trl = compat.generalized_jsd_loss(s, t, beta=0.5)
    _close(trl, fdistill.divergence_loss(s, t, "jsd", beta=0.5) * T)
    # with labels, by the tokens not ignored: fdistill's mean
    labels = _labels(B * T).reshape(B, T)
    _close(compat.generalized_jsd_loss(s, t, labels), fdistill.divergence_loss(s, t, "jsd", labels=labels))
    # num_items_in_batch overrides the reduction
    total = compat.generalized_jsd_loss(s, t, labels, reduction="sum")
    _close(compat.generalized_jsd_loss(s, t, labels, reduction="mean", num_items_in_batch=torch.tensor(4)),
           total / 4)  # fmt: skip
    # mean with every token ignored: 0 (TRL: nan)
    assert compat.generalized_jsd_loss(s, t, torch.full((B, T), IGN), reduction="mean").item() == 0.0
    # the input dtype comes back
    assert compat.generalized_jsd_loss(s.bfloat16(), t.bfloat16()).dtype == torch.bfloat16
    # a teacher that requires grad is differentiated, as TRL's autograd does
    tl = _leaf(t)
    compat.generalized_jsd_loss(s, tl, labels, beta=0.3, temperature=1.5).backward()
    t64 = _leaf(t, F64)
    ref_trl(s.double(), t64, labels, 0.3, 1.5, "batchmean").backward()
    _close(tl.grad, t64.grad)


# ----------------------------------------------------------------------------- torchtune


def ref_torchtune_rows(s, t, ratio):
    """ratio * (-sum p log q) + (1 - ratio) * KL(q || p), per token (torchtune's forward is the CE)."""
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    forward = -(log_p.exp() * log_q).sum(-1)
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
    return ratio * forward + (1 - ratio) * reverse


def _torchtune_module(kind, ratio, chunked):
    if kind == "forward":
        return compat.ForwardKLWithChunkedOutputLoss(3) if chunked else compat.ForwardKLLoss()
    if kind == "reverse":
        return compat.ReverseKLWithChunkedOutputLoss(3) if chunked else compat.ReverseKLLoss()
    if chunked:
        return compat.SymmetricKLWithChunkedOutputLoss(3, sym_kd_ratio=ratio)
    return compat.SymmetricKLLoss(sym_kd_ratio=ratio)


@pytest.mark.parametrize("kind,ratio", [("forward", 1.0), ("reverse", 0.0), ("symmetric", 0.3),
                                        ("symmetric", 1.0)])  # fmt: skip
@pytest.mark.parametrize("chunked", [False, True], ids=["flat", "chunked"])
def test_torchtune_kd_losses(kind, ratio, chunked):
    B, T = 2, 7  # 7 positions in 3 uneven chunks (3, 2, 2), as tensor_split makes them
    s, t = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    labels = _labels(B * T).reshape(B, T)
    module = _torchtune_module(kind, ratio, chunked)
    xs = _leaf(s)
    if chunked:
        got = module(list(xs.tensor_split(3, dim=1)), list(t.tensor_split(3, dim=1)), labels)
    else:
        got = module(xs.reshape(-1, V), t.reshape(-1, V), labels.reshape(-1))
    (gs,) = torch.autograd.grad(got, xs)
    s64 = _leaf(s, F64)
    want = ref_masked_mean(ref_torchtune_rows(s64, t.double(), ratio).reshape(-1), labels.reshape(-1))
    (ws,) = torch.autograd.grad(want, s64)
    _close(got.detach(), want.detach())
    _close(gs, ws)
    assert got.dtype == torch.float32 and got.dim() == 0


def test_torchtune_conventions():
    n = 6
    s, t = torch.randn(n, V), torch.randn(n, V)
    labels = _labels(n)
    # torchtune's "forward KL" is the cross-entropy: KL(p || q) + H(p), with the gradient of KL
    keep = labels != IGN
    p = t.softmax(-1)
    entropy = -(p * p.log()).sum(-1)[keep].mean()
    fkl = compat.ForwardKLLoss()(s, t, labels)
    _close(fkl, fdistill.divergence_loss(s, t, labels=labels) + entropy)
    # normalize=False: the sum
    _close(compat.ForwardKLLoss()(s, t, labels, normalize=False), fkl * int(keep.sum()))
    # every token ignored: 0 (torchtune's reverse / symmetric chunked: nan)
    none = torch.full((1, n), IGN)
    chunks_s, chunks_t = [s.reshape(1, n, V)], [t.reshape(1, n, V)]
    assert compat.ReverseKLWithChunkedOutputLoss(1)(chunks_s, chunks_t, none).item() == 0.0
    assert compat.ForwardKLLoss()(s, t, none.reshape(-1)).item() == 0.0
    # a teacher that requires grad is differentiated (torchtune's autograd reaches it)
    tl = _leaf(t)
    compat.SymmetricKLLoss(0.4)(s, tl, labels).backward()
    t64 = _leaf(t, F64)
    ref_masked_mean(ref_torchtune_rows(s.double(), t64, 0.4), labels).backward()
    _close(tl.grad, t64.grad)


def test_other_ignore_index_values():
    n, ign = 6, 3  # a label value that is also a token id
    lq, lp = torch.randn(n, V).log_softmax(-1), torch.randn(n, V).log_softmax(-1)
    labels = torch.tensor([3, 0, 5, 3, 9, 1])
    jsd = ref_liger_jsd_elem(lq.double(), lp.double(), 0.4).sum(-1)
    _close(compat.LigerJSD(0.4, ignore_index=ign)(lq, lp, labels), ref_masked_mean(jsd, labels, ign))
    p, q = lq.exp(), lp.exp()
    tvd = 0.5 * (p.double() - q.double()).abs().sum(-1)
    _close(compat.LigerTVDLoss(ignore_index=ign)(p, q, labels), ref_masked_mean(tvd, labels, ign))
    s, t = torch.randn(n, V), torch.randn(n, V)
    _close(compat.ForwardKLLoss(ignore_index=ign)(s, t, labels),
           ref_masked_mean(ref_torchtune_rows(s.double(), t.double(), 1.0), labels, ign))  # fmt: skip
    x, w, xt, wt, _, _ = _heads(n=n)
    rows = ref_jsd_of_logits(x.double() @ w.double().T, xt.double() @ wt.double().T, 0.5, 1.0).sum(-1)
    got = compat.liger_fused_linear_jsd(x, w, xt, wt, labels, ignore_index=ign)
    _close(got, ref_masked_mean(rows, labels, ign))


def test_trl_and_torchtune_promote_mixed_dtypes():
    s, t = torch.randn(2, 3, V), torch.randn(2, 3, V).double()
    want = ref_trl(s.double(), t, None, 0.5, 1.0, "batchmean")
    _close(compat.generalized_jsd_loss(s, t), want)
    assert compat.generalized_jsd_loss(s, t).dtype == torch.float64  # TRL's promoted dtype
    labels = torch.zeros(6, dtype=torch.long)
    _close(compat.ReverseKLLoss()(s.reshape(6, V), t.reshape(6, V), labels),
           ref_torchtune_rows(s.double(), t, 0.0).mean())  # fmt: skip


TRITON_CASE = pytest.param("triton", marks=[SKIP_WITHOUT_TRITON, *TRITON_INTERPRETER_WARNINGS])


@pytest.mark.parametrize("backend", ["cpu", TRITON_CASE])
def test_teacher_entropy_rows_with_a_stride_0_uniform_student(backend, monkeypatch):
    """torchtune's forward term needs H(p) = log V - KL(p || uniform), the uniform student being one row
    of zeros broadcast with row stride 0: both fused backends read it as is."""
    device = torch.device("cpu") if backend == "cpu" else TRITON_DEVICE
    t = (torch.randn(5, V) * 3).to(device)
    labels = torch.tensor([0, IGN, 2, 3, 4], device=device)
    calls = []
    real = fdistill.compat._common.divergence_loss
    monkeypatch.setattr(fdistill.compat._common, "divergence_loss",
                        lambda *a, **k: calls.append(1) or real(*a, **k, backend=backend))  # fmt: skip
    got = teacher_entropy_rows(t, labels, IGN)
    p = t.double().softmax(-1)
    want = -(p * p.log()).sum(-1) * (labels != IGN)
    _close(got.cpu(), want.cpu())
    assert calls


def _compat_calls():
    """One call per compat module family: (name, fn(student leaf) -> loss, student)."""
    n = 6
    lq, lp = torch.randn(n, V).log_softmax(-1), torch.randn(n, V).log_softmax(-1)
    labels = _labels(n)
    s, t = torch.randn(2, 3, V), torch.randn(2, 3, V)
    x, w, xt, wt, b, bt = _heads(n=n, bias=True)
    return {
        "liger_jsd": (lambda z: compat.liger_jsd(z, lp, labels, beta=0.3), lq),
        "liger_kl_div": (lambda z: compat.liger_kl_div(z, lp.exp(), reduction="batchmean"), lq),
        "liger_fused_linear_jsd": (
            lambda z: compat.liger_fused_linear_jsd(z, w, xt, wt, labels, 0.4, temperature=2.0),
            x,
        ),
        "liger_fused_linear_jsd_loss": (
            lambda z: compat.liger_fused_linear_jsd_loss(
                z, w, xt, wt, labels, b, bt, 0.3, 0.7, temperature=2.0
            ),
            x,
        ),
        "generalized_jsd_loss": (lambda z: compat.generalized_jsd_loss(z, t, beta=0.3, temperature=2.0), s),
        "SymmetricKLWithChunkedOutputLoss": (
            lambda z: compat.SymmetricKLWithChunkedOutputLoss(2, 0.3)(
                list(z.tensor_split(2, 1)), list(t.tensor_split(2, 1)), labels.reshape(2, 3)
            ),
            s,
        ),
    }


@SKIP_WITHOUT_TRITON
@pytest.mark.parametrize("name", list(_compat_calls()))
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
def test_compat_on_the_triton_kernels(name, monkeypatch):
    """The same compat call with fdistill's kernels forced to Triton (on CPU tensors: the interpreter;
    on CUDA tensors the default anyway) agrees with the C++ kernels, value and gradient."""
    fn, student = _compat_calls()[name]
    z = _leaf(student)
    want, (wz,) = _grads(lambda: fn(z), z)

    def forced(real):  # the teacher-gradient path is the reference backend's
        return lambda *a, **k: real(*a, **k, backend="reference" if k.get("grad_teacher") else "triton")

    for module in (compat._common, compat.liger, compat.torchtune, compat.trl):
        monkeypatch.setattr(module, "divergence_loss", forced(module.divergence_loss))
    for fused in ("fused_linear_divergence_loss", "fused_linear_fy_loss"):
        monkeypatch.setattr(compat.liger, fused, forced(getattr(compat.liger, fused)))
    z2 = _leaf(student)
    got, (gz,) = _grads(lambda: fn(z2), z2)
    _close(got, want)
    _close(gz, wz)


# ----------------------------------------------------------------------------- bad input and imports


def test_bad_input_names_the_argument():
    lq, lp = torch.randn(4, V).log_softmax(-1), torch.randn(4, V).log_softmax(-1)
    with pytest.raises(ValueError, match="beta"):
        compat.LigerJSD(beta=1.5)
    with pytest.raises(ValueError, match="input must be \\(BT, V\\)"):
        compat.liger_jsd(lq.reshape(2, 2, V), lp.reshape(2, 2, V))
    with pytest.raises(ValueError, match="shift_labels"):
        compat.liger_jsd(lq, lp, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        compat.liger_kl_div(lq, lp.exp(), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        compat.LigerTVDLoss(reduction="elementwise")
    with pytest.raises(ValueError, match="temperature"):
        compat.LigerFusedLinearJSD(temperature=-1.0)
    x, w, xt, wt, _, _ = _heads(vocab_t=V - 2)
    with pytest.raises(ValueError, match="teacher_weight"):
        compat.liger_fused_linear_jsd_loss(x, w, xt, wt, _labels(x.shape[0]))
    with pytest.raises(ValueError, match="weight_hard_loss"):
        compat.LigerFusedLinearJSDLoss(weight_hard_loss=-0.1)
    with pytest.raises(TypeError, match="true_labels"):
        compat.liger_fused_linear_jsd_loss(x, w, xt, wt[:V], None)
    s, t = torch.randn(2, 3, V), torch.randn(2, 3, V)
    with pytest.raises(ValueError, match="reduction"):
        compat.generalized_jsd_loss(s, t, reduction="token_mean")
    with pytest.raises(ValueError, match="student_logits .* teacher_logits .* same shape"):
        compat.generalized_jsd_loss(s, t[..., :-1])
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        compat.SymmetricKLLoss(sym_kd_ratio=2.0)
    with pytest.raises(ValueError, match="num_output_chunks"):
        compat.ForwardKLWithChunkedOutputLoss(0)
    with pytest.raises(ValueError, match="the chunks hold 2 positions, labels 3"):
        compat.ForwardKLWithChunkedOutputLoss(1)([s[:, :2]], [t[:, :2]], torch.zeros(2, 3, dtype=torch.long))


def test_importing_fdistill_imports_no_peer():
    code = (
        "import sys, fdistill, fdistill.compat\n"
        "peers = {'transformers', 'trl', 'torchtune', 'liger_kernel'}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in peers)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
