"""Fused-linear losses against the materialised float64 computation written here.

The oracle forms ``softcap(h W^T + b)`` in float64, takes the per-token divergence with the float64
PyTorch reference (``divergence_rows_reference``) on the shared vocabulary, adds the cross-entropy and
reduces; gradients are float64 autograd through all of it. Sizes are odd on purpose: 37 tokens in
chunks of 16 (a partial last chunk), V = 1271.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from utils import CASE_IDS, DIVERGENCE_CASES, SKIP_WITHOUT_TRITON, TRITON_DEVICE, param_of, randn

import fdistill
from fdistill.chunked_head import default_chunk_size
from fdistill.reference import divergence_rows_reference

N, H, V = 37, 24, 1271
CHUNK = 16
IGNORE = -100


# ----------------------------------------------------------------------------- inputs and the oracle


def make_head(seed, tokens=N, hidden=H, vocab=V, dtype=torch.float32, scale=1.0, bias=True):
    """(hidden, weight, bias) with logits of standard deviation about ``2.5 * scale``."""
    h = randn((tokens, hidden), seed, torch.float64)
    w = randn((vocab, hidden), seed + 1, torch.float64) * (2.5 * scale / math.sqrt(hidden))
    b = randn((vocab,), seed + 2, torch.float64) * 0.5 if bias else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b)


def make_labels(seed, tokens=N, vocab=V):
    g = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    ignore = torch.rand(tokens, generator=g) < 0.3
    ignore[0], ignore[-1] = True, False
    return labels.masked_fill(ignore, IGNORE)


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def capped(z, softcap):
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def oracle(
    student,
    teacher_logits,
    divergence,
    options,
    *,
    temperature=1.0,
    labels=None,
    hard=0.0,
    softcap=None,
    reduction="mean",
    grad_out=None,
    scale_t2=False,
):
    """(loss, (dh, dW, db)) in float64; ``teacher_logits`` is float64 [N, V_shared]."""
    h, w, b = leaves(*(None if t is None else t.double() for t in student))
    z = capped(h @ w.T + (0 if b is None else b), softcap)
    shared = teacher_logits.shape[-1]
    rows = divergence_rows_reference(
        z[:, :shared], teacher_logits, divergence, param_of(divergence, options), temperature
    )
    if scale_t2:
        rows = rows * temperature**2
    if hard:
        rows = rows + hard * F.cross_entropy(z, labels, ignore_index=IGNORE, reduction="none")
    if labels is not None:
        rows = torch.where(labels != IGNORE, rows, torch.zeros_like(rows))
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        count = rows.numel() if labels is None else int((labels != IGNORE).sum())
        loss = rows.sum() / max(count, 1)
    inputs = [t for t in (h, w, b) if t is not None]
    if not loss.requires_grad:  # constant in the student (skew_kl with skew = 1)
        return loss.detach(), [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(loss, inputs, grad_out)
    return loss.detach(), grads


def fused(student, reduction="mean", grad_out=None, fn=None, **kwargs):
    """(loss, grads of the student's hidden, weight and bias) of the fused loss."""
    h, w, b = leaves(*student)
    if fn is None:
        loss = fdistill.fused_linear_divergence_loss(h, w, student_bias=b, reduction=reduction, **kwargs)
    else:
        loss = fn(h, w, bias=b, reduction=reduction, **kwargs)
    inputs = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(loss, inputs, grad_out)
    return loss.detach(), grads


def assert_matches(actual, expected, rtol, atol, what=""):
    (loss, grads), (want_loss, want_grads) = actual, expected
    torch.testing.assert_close(
        loss.double(), want_loss, rtol=rtol, atol=atol, msg=lambda m: f"{what} loss: {m}"
    )
    for name, g, want in zip(("hidden", "weight", "bias"), grads, want_grads, strict=False):
        scale = max(want.abs().max().item(), 1e-4)  # (a gradient that is exactly 0 allows rounding noise)
        torch.testing.assert_close(
            g.double(), want, rtol=rtol, atol=atol * scale, msg=lambda m, name=name: f"{what} d{name}: {m}"
        )


def errors_vs_oracle(got, want):
    """[|loss error|, max |grad error| / max |grad| for hidden, weight, bias]."""
    (loss, grads), (want_loss, want_grads) = got, want
    return [(loss.double() - want_loss).abs().max().item()] + [
        ((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(grads, want_grads, strict=True)
    ]


def assert_no_worse_than_eager(got, eager, want, factor, atol, what=""):
    """The fused result is within ``factor`` x the materialised eager error (vs float64) + ``atol``
    (relative to the loss for the loss, to the largest entry for the gradients)."""
    loss_scale = max(1.0, want[0].abs().max().item())
    for name, got_err, eager_err, scale in zip(
        ("loss", "dhidden", "dweight", "dbias"),
        errors_vs_oracle(got, want),
        errors_vs_oracle(eager, want),
        (loss_scale, 1, 1, 1),
        strict=True,
    ):
        assert got_err <= factor * eager_err + atol * scale, (
            f"{what} {name}: fused {got_err:.2e} vs eager {eager_err:.2e} (scale {scale:.2e})"
        )


def eager_result(student, teacher_logits, divergence, backend="reference", **options):
    """The materialised computation in the inputs' dtype: logits by one matmul, then divergence_loss."""
    h, w, b = leaves(*student)
    loss = fdistill.divergence_loss(F.linear(h, w, b), teacher_logits, divergence, backend=backend, **options)
    return loss.detach(), torch.autograd.grad(loss, (h, w, b))


def teacher_head_logits(seed, dtype=torch.float64, vocab=V, hidden=H, softcap=None):
    th, tw, tb = make_head(seed + 100, hidden=hidden, vocab=vocab, dtype=dtype)
    return (th, tw, tb), capped(th.double() @ tw.double().T + tb.double(), softcap)


# ----------------------------------------------------------------------------- every divergence


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_every_divergence_with_every_option(case, backend, reduction, seed):
    """Bias, softcap on both heads, temperature, labels with ignored tokens, hard loss, T^2, partial
    chunks: float32 fused vs float64 materialised."""
    divergence, options = case
    student = make_head(seed)
    (th, tw, tb), teacher = teacher_head_logits(seed, torch.float32, softcap=7.0)
    labels = make_labels(seed)
    grad_out = randn((N,), seed + 9, torch.float64) if reduction == "none" else None
    common = dict(temperature=1.7, labels=labels, softcap=5.0, reduction=reduction)
    want = oracle(student, teacher, divergence, options, hard=0.3, grad_out=grad_out, scale_t2=True, **common)
    got = fused(
        student,
        teacher_hidden=th,
        teacher_weight=tw,
        teacher_bias=tb,
        teacher_softcap=7.0,
        divergence=divergence,
        hard_loss_weight=0.3,
        scale_by_temperature_squared=True,
        chunk_size=CHUNK,
        backend=backend,
        grad_out=None if grad_out is None else grad_out.float(),
        **common,
        **options,
    )
    assert_matches(got, want, rtol=2e-5, atol=2e-6, what=f"{divergence}{options}")


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_plain_head_float64_is_exact(case, seed):
    """No bias, no labels: float64 inputs agree with the oracle to rounding."""
    divergence, options = case
    student = make_head(seed, dtype=torch.float64, bias=False)
    teacher = randn((N, V), seed + 5, torch.float64) * 2.5
    want = oracle(student, teacher, divergence, options)
    got = fused(student, teacher_logits=teacher, divergence=divergence, chunk_size=CHUNK, **options)
    assert_matches(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, N, 1000, None])
def test_chunk_size_does_not_change_the_result(chunk_size, seed):
    student = make_head(seed, dtype=torch.float64)
    teacher = randn((N, V), seed + 5, torch.float64) * 2.5
    labels = make_labels(seed)
    want = oracle(student, teacher, "jsd", {"beta": 0.3}, labels=labels, hard=0.5)
    got = fused(
        student,
        teacher_logits=teacher,
        divergence="jsd",
        beta=0.3,
        labels=labels,
        hard_loss_weight=0.5,
        chunk_size=chunk_size,
    )
    assert_matches(got, want, rtol=1e-10, atol=1e-12)


def test_batch_dimensions_are_flattened_and_restored(seed):
    student = make_head(seed, dtype=torch.float64)
    teacher = randn((N, V), seed + 5, torch.float64)
    h, w, b = student
    flat = fdistill.fused_linear_divergence_loss(
        h, w, student_bias=b, teacher_logits=teacher, reduction="none"
    )
    shaped = fdistill.fused_linear_divergence_loss(
        h[:36].reshape(4, 9, H),
        w,
        student_bias=b,
        teacher_logits=teacher[:36].reshape(4, 9, V),
        reduction="none",
    )
    assert shaped.shape == (4, 9)
    torch.testing.assert_close(shaped.reshape(-1), flat[:36])


# ----------------------------------------------------------------------------- teacher sources


def test_teacher_head_and_teacher_logits_agree(seed):
    student = make_head(seed)
    (th, tw, tb), teacher = teacher_head_logits(seed, torch.float32)
    by_head = fused(student, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, divergence="reverse_kl")
    by_logits = fused(student, teacher_logits=teacher.float(), divergence="reverse_kl")
    assert_matches(
        by_head, tuple((x.double(), [g.double() for g in gs]) for x, gs in [by_logits])[0], 1e-5, 1e-6
    )


def test_teacher_head_of_another_width(seed):
    """The teacher's hidden size differs from the student's (H_t = 40, H = 24)."""
    student = make_head(seed)
    (th, tw, tb), teacher = teacher_head_logits(seed, torch.float32, hidden=40)
    want = oracle(student, teacher, "forward_kl", {})
    got = fused(student, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
    assert_matches(got, want, 2e-5, 2e-6)


def test_teacher_gets_no_gradient(seed):
    student = make_head(seed)
    th, tw, tb = leaves(*make_head(seed + 100))
    _, grads = fused(student, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
    assert all(t.grad is None for t in (th, tw, tb)) and len(grads) == 3


def topk_of(teacher, k):
    logp = teacher.log_softmax(-1)
    values, indices = logp.topk(k, -1)
    return indices, values


@pytest.mark.parametrize(
    "case",
    [
        ("forward_kl", {}),
        ("skew_reverse_kl", {"skew": 0.1}),
        ("jsd", {"beta": 0.3}),
        ("tv", {}),
        ("alpha", {"alpha": 1.5}),
    ],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_renormalize_is_the_teacher_restricted_to_its_topk(case, temperature, seed):
    divergence, options = case
    student = make_head(seed)
    teacher = randn((N, V), seed + 5, torch.float64) * 3
    indices, logprobs = topk_of(teacher, 20)
    dense = torch.full((N, V), -math.inf, dtype=torch.float64).scatter(1, indices, logprobs)
    want = oracle(student, dense, divergence, options, temperature=temperature)
    got = fused(
        student,
        teacher_topk=(indices, logprobs.float()),
        divergence=divergence,
        temperature=temperature,
        chunk_size=CHUNK,
        **options,
    )
    # (skew reverse KL against a teacher with zeros is fp32-conditioned: as accurate as eager float32)
    eager = eager_result(student, dense.float(), divergence, temperature=temperature, **options)
    assert_no_worse_than_eager(got, eager, want, 2, 4 * torch.finfo(torch.float32).eps)
    assert_matches(got, want, 1e-4, 1e-4)


def test_topk_renormalize_makes_reverse_kl_infinite(seed):
    """The renormalised top-k teacher is 0 outside its top-k, where the student has mass: KL(q || p)
    is +inf (as on the materialised logits); the bucket tail keeps it finite."""
    student = make_head(seed)
    indices, logprobs = topk_of(randn((N, V), seed + 5, torch.float64) * 3, 20)
    h, w, b = student
    renormalized = fdistill.fused_linear_divergence_loss(
        h, w, student_bias=b, teacher_topk=(indices, logprobs.float()), divergence="reverse_kl"
    )
    bucket = fdistill.fused_linear_divergence_loss(
        h,
        w,
        student_bias=b,
        teacher_topk=(indices, logprobs.float()),
        divergence="reverse_kl",
        topk_tail="bucket",
    )
    assert renormalized.item() == math.inf and math.isfinite(bucket.item())


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_garbage_on_ignored_tokens_is_ignored(tail, seed):
    """Padding tokens' stored top-k may be anything (-1 ids, duplicates, NaN): ignored, not rejected."""
    student = make_head(seed)
    indices, logprobs = topk_of(randn((N, V), seed + 5, torch.float64) * 3, 20)
    labels = make_labels(seed)
    want = fused(student, teacher_topk=(indices, logprobs.float()), topk_tail=tail, labels=labels)
    ignored = labels == IGNORE
    indices[ignored] = -1
    logprobs[ignored] = math.nan
    got = fused(student, teacher_topk=(indices, logprobs.float()), topk_tail=tail, labels=labels)
    assert_matches(got, [want[0].double(), [g.double() for g in want[1]]], 1e-6, 1e-7)
    with pytest.raises(ValueError, match=">= 0"):
        fused(student, teacher_topk=(indices, logprobs.float()), topk_tail=tail)


def bucket_oracle(student, indices, logprobs, divergence, options, labels=None):
    """The (k + 1)-outcome divergence written directly: q_tail = 1 - sum q_topk in float64."""
    h, w, b = leaves(*(t.double() for t in student))
    q = (h @ w.T + b).softmax(-1)
    q_top = q.gather(1, indices)
    q_small = torch.cat([q_top, 1 - q_top.sum(1, keepdim=True)], 1)
    p_top = logprobs.double().exp()
    p_small = torch.cat([p_top, 1 - p_top.sum(1, keepdim=True)], 1)
    rows = divergence_rows_reference(q_small.log(), p_small.log(), divergence, param_of(divergence, options))
    if labels is not None:
        rows = torch.where(labels != IGNORE, rows, torch.zeros_like(rows))
        loss = rows.sum() / (labels != IGNORE).sum()
    else:
        loss = rows.mean()
    return loss.detach(), torch.autograd.grad(loss, (h, w, b))


@pytest.mark.parametrize(
    "case",
    [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}), ("skew_kl", {"skew": 0.1})],
    ids=lambda c: c[0],
)
def test_topk_bucket_matches_the_k_plus_one_outcome_divergence(case, seed):
    divergence, options = case
    student = make_head(seed)
    teacher = randn((N, V), seed + 5, torch.float64) * 3
    indices, logprobs = topk_of(teacher, 20)
    labels = make_labels(seed)
    want = bucket_oracle(student, indices, logprobs, divergence, options, labels)
    got = fused(
        student,
        teacher_topk=(indices, logprobs.float()),
        topk_tail="bucket",
        divergence=divergence,
        labels=labels,
        chunk_size=CHUNK,
        **options,
    )
    assert_matches(got, want, 2e-5, 2e-6)


def test_topk_bucket_with_all_the_mass_equals_the_full_divergence(seed):
    """k = V: the tail is empty (probability 0), so the bucket is the full divergence."""
    student = make_head(seed, tokens=5, vocab=31)
    teacher = randn((5, 31), seed + 5, torch.float64)
    indices, logprobs = topk_of(teacher, 31)
    want = oracle(student, teacher, "forward_kl", {})
    got = fused(student, teacher_topk=(indices, logprobs.float()), topk_tail="bucket")
    assert_matches(got, want, 2e-5, 2e-6)


# ----------------------------------------------------------------------------- vocabulary mismatch


@pytest.mark.parametrize("teacher_vocab", [V + 13, V - 13])
@pytest.mark.parametrize("source", ["head", "logits"])
def test_vocab_mismatch_masks_the_extra_ids(teacher_vocab, source, seed):
    student = make_head(seed)
    labels = make_labels(seed)
    (th, tw, tb), teacher = teacher_head_logits(seed, torch.float32, vocab=teacher_vocab)
    shared = min(V, teacher_vocab)
    want = oracle(student, teacher[:, :shared], "jeffreys", {"beta": 0.3}, labels=labels, hard=0.2)
    source_args = (
        dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
        if source == "head"
        else dict(teacher_logits=teacher.float())
    )
    got = fused(
        student,
        divergence="jeffreys",
        beta=0.3,
        labels=labels,
        hard_loss_weight=0.2,
        vocab_mismatch="mask",
        chunk_size=CHUNK,
        **source_args,
    )
    assert_matches(got, want, 2e-5, 2e-6)
    if teacher_vocab < V:  # the student's extra ids get gradient only from the hard loss
        _, (_, dw, _) = fused(student, divergence="jeffreys", beta=0.3, vocab_mismatch="mask", **source_args)
        assert torch.count_nonzero(dw[shared:]) == 0
    with pytest.raises(ValueError, match="vocab_mismatch='mask'"):
        fused(student, **source_args)


def test_topk_ids_beyond_the_student_vocabulary(seed):
    student = make_head(seed)
    teacher = randn((N, V + 13), seed + 5, torch.float64) * 3
    teacher[:, V:] += 4  # the extra ids are in every token's top-k
    indices, logprobs = topk_of(teacher, 30)
    assert bool((indices >= V).any())
    with pytest.raises(ValueError, match="must be < V"):
        fused(student, teacher_topk=(indices, logprobs.float()))
    dense = torch.full((N, V + 13), -math.inf, dtype=torch.float64).scatter(1, indices, logprobs)[:, :V]
    want = oracle(student, dense, "forward_kl", {})
    got = fused(student, teacher_topk=(indices, logprobs.float()), vocab_mismatch="mask")
    assert_matches(got, want, 2e-5, 2e-6)


# ----------------------------------------------------------------------------- dtypes and autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_low_precision_no_worse_than_materialised(dtype, divergence, seed):
    """Low-precision heads: the fused loss is no further from float64 than the materialised
    same-dtype computation (logits in ``dtype``, loss by ``divergence_loss``), within 1.5x + 1 ulp."""
    student = make_head(seed, dtype=dtype)
    (th, tw, tb), teacher = teacher_head_logits(seed, dtype)
    teacher64 = th.double() @ tw.double().T + tb.double()
    want = oracle(student, teacher64, divergence, {})
    got = fused(
        student,
        teacher_hidden=th,
        teacher_weight=tw,
        teacher_bias=tb,
        divergence=divergence,
        chunk_size=CHUNK,
    )
    eager = eager_result(student, F.linear(th, tw, tb), divergence, backend="cpu")
    assert_no_worse_than_eager(got, eager, want, 1.5, torch.finfo(dtype).eps)
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1])


def test_autocast_bfloat16(seed):
    """fp32 parameters under autocast: the matmuls run in bf16, gradients come back in fp32, and the
    result is as close to float64 as the materialised autocast computation."""
    student = make_head(seed)
    (th, tw, tb), teacher = teacher_head_logits(seed, torch.float32)
    want = oracle(student, teacher, "jsd", {"beta": 0.5})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(
            student, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, divergence="jsd", chunk_size=CHUNK
        )
        t = F.linear(th, tw, tb)
        assert t.dtype == torch.bfloat16
        eager = eager_result(student, t, "jsd", backend="cpu")
    assert all(g.dtype == torch.float32 for g in got[1])
    assert_no_worse_than_eager(got, eager, want, 1.5, torch.finfo(torch.bfloat16).eps)
    assert errors_vs_oracle(got, want)[0] > 1e-6  # it really ran in bf16


# ----------------------------------------------------------------------------- gradcheck and special inputs


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(backend, reduction, seed):
    h, w, b = leaves(*make_head(seed, tokens=5, hidden=3, vocab=11, dtype=torch.float64))
    teacher = randn((5, 11), seed + 5, torch.float64)
    labels = torch.tensor([1, IGNORE, 3, 10, 0])

    def fn(h, w, b):
        return fdistill.fused_linear_divergence_loss(
            h,
            w,
            student_bias=b,
            teacher_logits=teacher,
            divergence="jsd",
            beta=0.3,
            labels=labels,
            hard_loss_weight=0.5,
            softcap=3.0,
            temperature=1.3,
            reduction=reduction,
            chunk_size=2,
            backend=backend,
        )

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_gradcheck_fy(seed):
    h, w, b = leaves(*make_head(seed, tokens=5, hidden=3, vocab=11, dtype=torch.float64))
    target = torch.tensor([1, IGNORE, 3, 10, 0])

    def fn(h, w, b):
        return fdistill.fused_linear_fy_loss(h, w, target, bias=b, chunk_size=2, reduction="none")

    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_masked_vocabulary_and_identical_models(seed):
    """-inf bias entries mask ids in both heads (loss finite, zero gradient there); a student that
    equals its teacher has loss 0 and gradient 0."""
    h, w, b = make_head(seed, dtype=torch.float64)
    b[::5] = -math.inf
    teacher = h @ w.T + b
    loss, (dh, dw, db) = fused(
        (h, w, b), teacher_logits=teacher, divergence="jeffreys", beta=0.5, chunk_size=CHUNK
    )
    assert loss.abs() < 1e-12 and dh.abs().max() < 1e-12 and dw.abs().max() < 1e-12 and db.abs().max() < 1e-12
    teacher2 = teacher + randn((N, V), seed + 3, torch.float64)
    want = oracle((h, w, b), teacher2, "forward_kl", {})
    got = fused((h, w, b), teacher_logits=teacher2, chunk_size=CHUNK)
    assert torch.isfinite(got[0]) and torch.all(got[1][2][::5] == 0)
    assert_matches(got, want, 1e-10, 1e-12)


def test_large_logits(seed):
    """Logits of size ~1e3 in float32: the fused loss is as accurate as the materialised one (2x its
    error vs float64 + 4 eps; saturated TV / JSD gradients are rounding noise around 0 in both)."""
    student = make_head(seed, scale=40.0)
    teacher = randn((N, V), seed + 5, torch.float64) * 100
    eps = torch.finfo(torch.float32).eps
    for divergence in ("forward_kl", "reverse_kl", "tv", "jsd"):
        want = oracle(student, teacher, divergence, {})
        got = fused(student, teacher_logits=teacher.float(), divergence=divergence, chunk_size=CHUNK)
        eager = eager_result(student, teacher.float(), divergence, backend="cpu")
        assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1])
        assert_no_worse_than_eager(got, eager, want, 2, 4 * eps, what=divergence)


def test_no_grad_and_frozen_inputs(seed):
    h, w, b = make_head(seed)
    teacher = randn((N, V), seed + 5)
    want = fdistill.fused_linear_divergence_loss(h, w, student_bias=b, teacher_logits=teacher)
    with torch.no_grad():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fdistill.fused_linear_divergence_loss(hh, ww, student_bias=b, teacher_logits=teacher)
    assert loss.grad_fn is None and torch.equal(loss, want)
    # only the weight requires grad: it alone gets a gradient, equal to the one with all three
    ww = w.clone().requires_grad_()
    fdistill.fused_linear_divergence_loss(h, ww, student_bias=b, teacher_logits=teacher).backward()
    _, (_, dw, _) = fused((h, w, b), teacher_logits=teacher)
    torch.testing.assert_close(ww.grad, dw)


def test_backward_scales_by_the_incoming_gradient(seed):
    student = make_head(seed, dtype=torch.float64)
    teacher = randn((N, V), seed + 5, torch.float64)
    h, w, b = leaves(*student)
    (
        3.5
        * fdistill.fused_linear_divergence_loss(h, w, student_bias=b, teacher_logits=teacher, reduction="sum")
    ).backward()
    _, want = oracle(student, teacher, "forward_kl", {}, reduction="sum")
    for g, wg in zip((h.grad, w.grad, b.grad), want, strict=True):
        torch.testing.assert_close(g, 3.5 * wg)


def test_no_tokens(seed):
    h, w, b = leaves(*make_head(seed, tokens=0))
    loss = fdistill.fused_linear_divergence_loss(h, w, student_bias=b, teacher_logits=torch.zeros(0, V))
    loss.backward()
    assert loss.item() == 0 and w.grad.abs().sum() == 0 and h.grad.shape == (0, H)


def test_default_chunk_size():
    cpu = torch.device("cpu")
    assert default_chunk_size(32000, 512, cpu) == 512
    assert default_chunk_size(128256, 4096, torch.device("cuda")) == 512
    assert default_chunk_size(10, 4096, cpu) == 8192
    assert default_chunk_size(256000, 64, cpu) == 64


# ----------------------------------------------------------------------------- fused FY loss


@pytest.mark.parametrize("f, alpha", [("alpha", 1.5), ("alpha", 2.0), ("kl", 1.5), ("js", 1.5)])
@pytest.mark.parametrize("target_kind", ["labels", "probs"])
def test_fy_matches_fy_loss_on_materialised_logits(f, alpha, target_kind, seed):
    h, w, b = make_head(seed, dtype=torch.float64)
    if target_kind == "labels":
        target = make_labels(seed)
    else:
        target = (randn((N, V), seed + 5, torch.float64) * 2).softmax(-1)
    hh, ww, bb = leaves(h, w, b)
    z = 4.0 * torch.tanh((hh @ ww.T + bb) / 4.0)
    want_loss = fdistill.fy_loss(z, target, f, alpha=alpha, temperature=1.5, backend="reference")
    want = (want_loss.detach(), torch.autograd.grad(want_loss, (hh, ww, bb)))
    got = fused(
        (h, w, b),
        fn=fdistill.fused_linear_fy_loss,
        target=target,
        f=f,
        alpha=alpha,
        temperature=1.5,
        softcap=4.0,
        chunk_size=CHUNK,
    )
    assert_matches(got, want, 1e-8, 1e-10)


def test_fy_with_a_reference_measure(seed):
    h, w, b = make_head(seed, dtype=torch.float64)
    labels = make_labels(seed)
    for reference in (randn((V,), seed, torch.float64).exp(), randn((N, V), seed, torch.float64).exp()):
        hh, ww, bb = leaves(h, w, b)
        want_loss = fdistill.fy_loss(hh @ ww.T + bb, labels, reference=reference, backend="reference")
        want = (want_loss.detach(), torch.autograd.grad(want_loss, (hh, ww, bb)))
        got = fused(
            (h, w, b), fn=fdistill.fused_linear_fy_loss, target=labels, reference=reference, chunk_size=CHUNK
        )
        assert_matches(got, want, 1e-8, 1e-10)


# ----------------------------------------------------------------------------- modules


def test_modules_match_the_functions(seed):
    h, w, b = make_head(seed)
    (th, tw, tb), _ = teacher_head_logits(seed, torch.float32)
    labels = make_labels(seed)
    module = fdistill.FusedLinearDivergenceLoss("jsd", beta=0.2, hard_loss_weight=0.5, chunk_size=CHUNK)
    got = module(h, w, th, tw, labels, student_bias=b, teacher_bias=tb)
    want = fdistill.fused_linear_divergence_loss(
        h,
        w,
        student_bias=b,
        teacher_hidden=th,
        teacher_weight=tw,
        teacher_bias=tb,
        labels=labels,
        divergence="jsd",
        beta=0.2,
        hard_loss_weight=0.5,
        chunk_size=CHUNK,
    )
    assert torch.equal(got, want) and "jsd" in repr(module)
    fy = fdistill.FusedLinearFYLoss("alpha", alpha=1.5)
    torch.testing.assert_close(fy(h, w, labels, b), fdistill.fused_linear_fy_loss(h, w, labels, bias=b))
    with pytest.raises(TypeError, match="unknown options"):
        fdistill.FusedLinearDivergenceLoss(labels=labels)
    with pytest.raises(TypeError, match="unknown inputs"):
        module(h, w, th, tw, student_logits=h)


# ----------------------------------------------------------------------------- Triton row kernels


@SKIP_WITHOUT_TRITON
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "case", [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("alpha", {"alpha": 1.5})], ids=lambda c: c[0]
)
def test_triton_backend(case, seed):
    divergence, options = case
    tokens, vocab = 9, 300
    student = [t.to(TRITON_DEVICE) for t in make_head(seed, tokens=tokens, vocab=vocab)]
    teacher = randn((tokens, vocab), seed + 5, torch.float64)
    labels = make_labels(seed, tokens, vocab)
    want = oracle(
        [t.cpu() for t in student], teacher, divergence, options, labels=labels, hard=0.3, temperature=1.5
    )
    got = fused(
        student,
        teacher_logits=teacher.float().to(TRITON_DEVICE),
        divergence=divergence,
        labels=labels.to(TRITON_DEVICE),
        hard_loss_weight=0.3,
        temperature=1.5,
        chunk_size=4,
        backend="triton",
        **options,
    )
    got = (got[0].cpu(), [g.cpu() for g in got[1]])
    assert_matches(got, want, 1e-4, 1e-5)


# ----------------------------------------------------------------------------- bad input


def _bad_cases(h, w, b, teacher, labels):
    idx, lp = topk_of(teacher.double(), 5)
    lp = lp.float()
    dup = idx.clone()
    dup[:, 1] = dup[:, 0]
    return [
        (dict(), ValueError, "exactly one teacher"),
        (dict(teacher_logits=teacher, teacher_topk=(idx, lp)), ValueError, "exactly one teacher"),
        (dict(teacher_hidden=h), ValueError, "teacher_hidden and teacher_weight go together"),
        (dict(teacher_logits=teacher, teacher_bias=b), ValueError, "teacher_bias and teacher_softcap"),
        (dict(teacher_logits=teacher[:5]), ValueError, "teacher_logits"),
        (dict(teacher_logits=teacher.long()), TypeError, "teacher_logits must be float"),
        (dict(teacher_logits=teacher, divergence="kl"), ValueError, "divergence must be one of"),
        (dict(teacher_logits=teacher, beta=2.0, divergence="jsd"), ValueError, "beta must be in"),
        (dict(teacher_logits=teacher, temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(teacher_logits=teacher, reduction="avg"), ValueError, "reduction must be one of"),
        (dict(teacher_logits=teacher, hard_loss_weight=0.5), ValueError, "needs labels"),
        (dict(teacher_logits=teacher, hard_loss_weight=-1.0, labels=labels), ValueError, "hard_loss_weight"),
        (dict(teacher_logits=teacher, labels=labels[:5]), ValueError, "labels"),
        (dict(teacher_logits=teacher, labels=labels.float()), TypeError, "labels must be an integer"),
        (
            dict(teacher_logits=teacher, labels=labels.clamp(min=0) + V),
            ValueError,
            r"labels must be in \[0, 1271\)",
        ),
        (dict(teacher_logits=teacher, softcap=0.0), ValueError, "softcap must be None or > 0"),
        (dict(teacher_logits=teacher, softcap="30"), TypeError, "softcap must be a real"),
        (dict(teacher_logits=teacher, chunk_size=0), ValueError, "chunk_size"),
        (dict(teacher_logits=teacher, vocab_mismatch="pad"), ValueError, "vocab_mismatch must be one of"),
        (dict(teacher_logits=teacher, backend="cuda"), ValueError, "backend must be one of"),
        (dict(teacher_topk=(idx, lp), topk_tail="drop"), ValueError, "topk_tail must be one of"),
        (
            dict(teacher_topk=(idx, lp), topk_tail="bucket", temperature=2.0),
            ValueError,
            "needs temperature=1",
        ),
        (dict(teacher_topk=(idx,)), TypeError, "pair"),
        (dict(teacher_topk=(idx.float(), lp)), TypeError, "indices must be an integer"),
        (dict(teacher_topk=(idx[:, :3], lp)), ValueError, "must both be"),
        (dict(teacher_topk=(idx - 10_000, lp)), ValueError, ">= 0"),
        (dict(teacher_topk=(dup, lp)), ValueError, "distinct"),
        (dict(teacher_topk=(idx, lp + 10)), ValueError, "log-probabilities"),
        (dict(teacher_topk=(idx, lp.clamp(min=-0.1)), topk_tail="bucket"), ValueError, "sum to at most 1"),
        (dict(teacher_hidden=h, teacher_weight=w[:, :5]), ValueError, "teacher_weight must be"),
        (dict(teacher_hidden=h, teacher_weight=w, teacher_softcap=-1.0), ValueError, "teacher_softcap"),
    ]


def test_bad_input_is_named(seed):
    h, w, b = make_head(seed)
    teacher = randn((N, V), seed + 5)
    labels = make_labels(seed)
    for kwargs, error, match in _bad_cases(h, w, b, teacher, labels):
        with pytest.raises(error, match=match):
            fdistill.fused_linear_divergence_loss(h, w, student_bias=b, **kwargs)
    with pytest.raises(TypeError, match="student_hidden .* and student_weight .* same dtype"):
        fdistill.fused_linear_divergence_loss(h.double(), w, teacher_logits=teacher)
    with pytest.raises(ValueError, match="student_weight must be"):
        fdistill.fused_linear_divergence_loss(h, w.T, teacher_logits=teacher)
    with pytest.raises(ValueError, match="student_bias must be"):
        fdistill.fused_linear_divergence_loss(h, w, student_bias=b[:5], teacher_logits=teacher)
    with pytest.raises(TypeError, match="student_hidden must be a torch.Tensor"):
        fdistill.fused_linear_divergence_loss(h.tolist(), w, teacher_logits=teacher)
    with pytest.raises(ValueError, match="f must be one of"):
        fdistill.fused_linear_fy_loss(h, w, labels, f="renyi")
    with pytest.raises(ValueError, match="probability target"):
        fdistill.fused_linear_fy_loss(h, w, teacher.softmax(-1)[:, :5])
    with pytest.raises(ValueError, match="reference"):
        fdistill.fused_linear_fy_loss(h, w, labels, reference=torch.ones(N, 5))
    with pytest.raises(ValueError, match="target must be in"):
        fdistill.fused_linear_fy_loss(h, w, labels + V)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_low_precision_logits_keep_the_float32_accumulator(dtype, beta, seed):
    """The logits are the matmul's float32 result, never rounded to ``dtype`` before the loss: the
    gradients (dh, dW) are closer to float64 than the materialised ``dtype`` path's, and dh is within
    Liger-Kernel's 1% regression limit (rounded logits gave 3.5-6.7% in bf16, 1.0-1.6% in fp16)."""
    student = make_head(seed, dtype=dtype)
    (th, tw, tb), _ = teacher_head_logits(seed, dtype)
    teacher64 = th.double() @ tw.double().T + tb.double()
    options = {"beta": beta}
    want = oracle(student, teacher64, "jsd", options)
    got = fused(student, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, divergence="jsd",
                chunk_size=CHUNK, **options)  # fmt: skip
    eager = eager_result(student, F.linear(th, tw, tb), "jsd", backend="cpu", **options)
    rel = lambda g, w: ((g.double() - w).norm() / w.norm()).item()  # noqa: E731
    # dW accumulates in the weight's dtype (its rounding dominates in fp16): only strictly better
    for name, g, e, w, factor in zip(
        ("dh", "dW"), got[1][:2], eager[1][:2], want[1][:2], (0.5, 1.0), strict=True
    ):
        assert rel(g, w) < factor * rel(e, w), f"{name}: fused {rel(g, w):.2e}, materialised {rel(e, w):.2e}"
    assert rel(got[1][0], want[1][0]) <= 1e-2
