"""The registered ops torch.ops.fdistill.*: contract, opcheck, gradcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from utils import (
    ALL_DTYPE_IDS,
    ALL_DTYPES,
    CASE_IDS,
    DIVERGENCE_CASES,
    OPCHECK_CASES,
    assert_close_verbose,
    assert_stats_hold_lse,
    compiled_vs_eager,
    make_labels,
    make_logits,
    opcheck_backward,
    opcheck_forward,
    param_of,
    reference_rows64,
)

import fdistill
from fdistill.ops import NUM_STATS

fwd = torch.ops.fdistill.divergence_fwd
bwd = torch.ops.fdistill.divergence_bwd


# ----------------------------------------------------------------------------- raw op contract


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_DTYPE_IDS)
def test_raw_op_output_contract(dtype, seed):
    student, teacher = make_logits((9, 300), dtype, seed=seed)
    labels = make_labels((9,), seed)
    loss, stats = fwd(student, teacher, labels, "jsd", 0.3, 2.0, -100)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == (9,) and loss.dtype == acc
    assert stats.shape == (9, NUM_STATS) and stats.dtype == acc
    assert (loss[labels == -100] == 0).all()
    # the saved statistics hold the log-sum-exps of the scaled logits as (max, log-sum)
    keep = labels != -100
    assert_stats_hold_lse(stats, student, teacher, keep, 2.0, 1e-12 if dtype == torch.float64 else 1e-5)
    weight = torch.randn(9, dtype=acc)
    grad = bwd(weight, student, teacher, labels, stats, "jsd", 0.3, 2.0, -100)
    assert grad.shape == student.shape and grad.dtype == dtype and grad.is_contiguous()
    assert (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_raw_backward_equals_autograd_and_accepts_strided_grad(case, seed):
    divergence, options = case
    param = param_of(divergence, options)
    student, teacher = make_logits((8, 129), torch.float64, seed=seed)
    labels = make_labels((8,), seed)
    s = student.clone().requires_grad_(True)
    loss, stats = fwd(s, teacher, labels, divergence, param, 1.5, -100)
    assert_close_verbose(
        loss, reference_rows64(student, teacher, divergence, param, 1.5, labels), 1e-12, 1e-12, "loss"
    )
    big = torch.randn(8, 3, dtype=torch.float64)
    upstream = big[:, 1]  # stride 3
    (want,) = torch.autograd.grad(loss, s, upstream)
    got = bwd(upstream, student, teacher, labels, stats.detach(), divergence, param, 1.5, -100)
    assert torch.equal(got, want)
    expanded = torch.tensor(0.7, dtype=torch.float64).expand(8)  # stride 0, as from a sum / mean
    got = bwd(expanded, student, teacher, labels, stats.detach(), divergence, param, 1.5, -100)
    assert_close_verbose(
        got,
        bwd(
            torch.full((8,), 0.7, dtype=torch.float64),
            student,
            teacher,
            labels,
            stats.detach(),
            divergence,
            param,
            1.5,
            -100,
        ),
        0,
        0,
        "stride 0 grad_loss",
    )


def test_raw_op_resolves_endpoints_like_the_reference():
    """jsd beta 0 / 1 and the skews at 0 run the plain KL kernels (same stats, bit for bit)."""
    student, teacher = make_logits((4, 50), torch.float32, seed=3)
    for divergence, param, plain in (
        ("jsd", 0.0, "forward_kl"),
        ("jsd", 1.0, "reverse_kl"),
        ("skew_kl", 0.0, "forward_kl"),
        ("skew_reverse_kl", 0.0, "reverse_kl"),
    ):
        got = fwd(student, teacher, None, divergence, param, 1.0, -100)
        want = fwd(student, teacher, None, plain, 0.0, 1.0, -100)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), divergence


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("labelled", [False, True], ids=["nolabels", "labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("divergence", "param"), OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_forward(divergence, param, dtype, labelled, seed):
    opcheck_forward(fwd, divergence, param, dtype, labelled, seed)


@pytest.mark.parametrize("labelled", [False, True], ids=["nolabels", "labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize(("divergence", "param"), OPCHECK_CASES[:3], ids=[c[0] for c in OPCHECK_CASES[:3]])
def test_opcheck_backward(divergence, param, dtype, labelled, seed):
    opcheck_backward(fwd, bwd, divergence, param, dtype, labelled, seed)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_gradcheck(case, backend, reduction, seed):
    divergence, options = case
    student, teacher = make_logits((2, 3, 17), torch.float64, scale=1.0, seed=seed, neg_inf_frac=0.1)
    labels = torch.tensor([[4, -100, 2], [0, 1, -100]])
    student.requires_grad_(True)

    def fn(s):
        return fdistill.divergence_loss(
            s,
            teacher,
            divergence,
            **options,
            temperature=1.7,
            labels=labels,
            reduction=reduction,
            backend=backend,
        )

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize(
    ("divergence", "options"),
    [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("alpha", {"alpha": 1.5}), ("tv", {})],
    ids=["forward_kl", "jsd", "alpha", "tv"],
)
def test_compile_aot_eager_fullgraph(divergence, options, fresh_dynamo, seed):
    def loss_fn(s, t, labels):
        return fdistill.divergence_loss(
            s,
            t,
            divergence,
            **options,
            labels=labels,
            temperature=2.0,
            scale_by_temperature_squared=True,
            backend="cpu",
        )

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    # a second batch size exercises the dynamic-shape path of the fake implementations
    compiled_vs_eager(compiled, loss_fn, [(2, 3, 257), (5, 3, 257)], torch.float32, seed)


def test_compile_aot_eager_reduction_none_bf16(fresh_dynamo, seed):
    def loss_fn(s, t, labels):
        rows = fdistill.divergence_loss(
            s, t, "skew_reverse_kl", labels=labels, reduction="none", backend="cpu"
        )
        return (rows * torch.linspace(0.5, 1.5, rows.shape[-1])).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    compiled_vs_eager(compiled, loss_fn, [(4, 3, 100)], torch.bfloat16, seed)


def test_compile_inductor(fresh_dynamo, seed):
    """The default backend (inductor, C++ codegen on CPU) around the custom op."""

    def loss_fn(s, t, labels):
        return fdistill.divergence_loss(s, t, "jsd", beta=0.3, labels=labels, temperature=1.5, backend="cpu")

    compiled = torch.compile(loss_fn, fullgraph=True)
    compiled_vs_eager(compiled, loss_fn, [(3, 4, 333)], torch.float32, seed)


def test_fake_tensor_shapes():
    """The fake implementations give the real outputs' metadata without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(7, 11, dtype=torch.bfloat16)
        loss, stats = fwd(s, torch.empty_like(s), None, "tv", 0.0, 1.0, -100)
        grad = bwd(torch.empty(7), s, torch.empty_like(s), None, stats, "tv", 0.0, 1.0, -100)
    assert loss.shape == (7,) and loss.dtype == torch.float32
    assert stats.shape == (7, NUM_STATS) and stats.dtype == torch.float32
    assert grad.shape == (7, 11) and grad.dtype == torch.bfloat16
    assert grad.is_contiguous()
