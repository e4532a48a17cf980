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
    opcheck_forward_grad,
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


@pytest.mark.parametrize("labelled", [False, True], ids=["nolabels", "labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize(("divergence", "param"), OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_forward_grad(divergence, param, dtype, labelled, seed):
    opcheck_forward_grad(torch.ops.fdistill.divergence_fwd_grad, divergence, param, dtype, labelled, seed)


@pytest.mark.parametrize(("divergence", "param"), OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_one_pass_gradient_matches_two_pass_and_float64(divergence, param, seed):
    """The one-pass op's gradient (times grad_scale) = the two-pass backward with grad_loss = grad_scale,
    and both match finite differences of the float64 reference loss."""
    student, teacher = make_logits((5, 1271), torch.float64, scale=4.0, seed=seed)
    labels = make_labels((5,), seed)
    args = (student, teacher, labels, divergence, param, 0.8, -100)
    loss, stats, grad = torch.ops.fdistill.divergence_fwd_grad(*args, 0.37)
    loss2, stats2 = fwd(*args)
    assert torch.equal(loss, loss2) and torch.equal(stats, stats2)
    two_pass = bwd(torch.full((5,), 0.37, dtype=torch.float64), *args[:3], stats, *args[3:])
    torch.testing.assert_close(grad, two_pass, atol=1e-15, rtol=1e-13)
    kwargs = {"alpha": param} if divergence == "alpha" else {"beta": param, "skew": param}
    x = student.clone().requires_grad_(True)
    ref = fdistill.divergence_loss(x, teacher, divergence, **kwargs, temperature=0.8, labels=labels,
                                   reduction="sum", backend="reference")  # fmt: skip
    (ref_grad,) = torch.autograd.grad(ref * 0.37, x)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_one_pass_repeated_backward_and_no_double_backward(reduction, seed):
    """retain_graph=True: every backward is exact (the first uses the one-pass gradient, later ones
    recompute); create_graph=True raises instead of a silently wrong second derivative."""
    student, teacher = make_logits((4, 6, 301), torch.float32, seed=seed)
    x = student.clone().requires_grad_(True)
    loss = fdistill.divergence_loss(x, teacher, "jsd", reduction=reduction, backend="cpu")
    y = student.clone().requires_grad_(True)
    ref = fdistill.divergence_loss(y, teacher, "jsd", reduction=reduction, backend="reference")
    for weight in (1.0, 0.25, -3.0):
        upstream = torch.full_like(loss, weight)
        (g,) = torch.autograd.grad(loss, x, upstream, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, y, upstream, retain_graph=True)
        torch.testing.assert_close(g, g_ref, atol=1e-7, rtol=1e-5)
    loss = fdistill.divergence_loss(x, teacher, "jsd", reduction=reduction, backend="cpu")
    with pytest.raises((RuntimeError, NotImplementedError), match="second derivative"):
        torch.autograd.grad(loss.sum(), x, create_graph=True)


def test_no_grad_forward_computes_no_gradient(seed):
    """Under no_grad (or a student that needs no gradient) the forward-only op runs: no [rows, V] buffer."""
    student, teacher = make_logits((4, 301), torch.float32, seed=seed)
    with torch.profiler.profile() as prof:
        with torch.no_grad():
            fdistill.divergence_loss(student.requires_grad_(True), teacher, backend="cpu")
        fdistill.divergence_loss(student.detach(), teacher, backend="cpu")
    names = [e.name for e in prof.events()]
    assert "fdistill::divergence_fwd" in names and "fdistill::divergence_fwd_grad" not in names


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
