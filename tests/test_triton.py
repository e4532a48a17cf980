"""The Triton kernels (backend="triton") against the float64 reference and the CPU kernel.

Without a GPU they run on CPU tensors under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1); with one, on CUDA tensors, where float32 exp / log are approximate and the
float32 tolerances get ``SLACK``. The interpreter emulates every program (one per row) with numpy,
so shapes are kept small. Tiles hold min(4096, next_pow2(V)) entries (2048 in float64): V = 1271 is
one tile, V = 4133 three (float64) or two (otherwise). The interpreter rounds float32 -> bfloat16
toward zero (CUDA rounds to nearest), so bfloat16 gradients may be 1 ulp off: within the bfloat16
tolerance (1 ulp) of the CPU tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from utils import (
    CASE_IDS,
    DIVERGENCE_CASES,
    INF,
    LARGE_CASES,
    ON_CUDA,
    OPCHECK_CASES,
    SCALE,
    SECTION,
    SECTION_IDS,
    SKIP_WITHOUT_TRITON,
    TRITON_DEVICE,
    TRITON_INTERPRETER_WARNINGS,
    OpRecorder,
    assert_close_verbose,
    assert_stats_hold_lse,
    case_id,
    check_against_oracle,
    check_all_tokens_ignored,
    check_ignored_rows_with_garbage,
    check_one_sided_neg_inf,
    check_scale_by_temperature_squared,
    check_special_rows,
    check_ties_give_zero,
    check_triton_agrees_with_cpu,
    compiled_vs_eager,
    generator,
    large_inputs,
    loss_and_grad,
    make_labels,
    make_logits,
    max_abs_err,
    opcheck_backward,
    opcheck_forward,
    opcheck_forward_grad,
    opposite_offset_logits,
    oracle_loss_and_grad,
    param_of,
    reference_rows64,
    special_rows_logits,
    tolerances,
    two_x_eager_violations,
)
from utils import randn as seeded_randn

import fdistill
from fdistill.ops import NUM_STATS

DEVICE = TRITON_DEVICE  # CUDA, else CPU tensors under the Triton interpreter
SLACK = 10.0 if ON_CUDA else 1.0  # CUDA float32 exp / log are approximate; the interpreter uses numpy's

pytestmark = [SKIP_WITHOUT_TRITON, *TRITON_INTERPRETER_WARNINGS]

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DTYPE_IDS = ["f32", "bf16", "f64"]


def logits(shape, dtype=torch.float32, seed=0, **kwargs):
    return make_logits(shape, dtype, seed=seed, device=DEVICE, **kwargs)


def randn(shape, seed, dtype=torch.float32):
    return seeded_randn(shape, seed, dtype, DEVICE)


def labels_for(lead_shape, seed):
    return make_labels(lead_shape, seed, device=DEVICE)


def check(student, teacher, divergence, options, **kwargs):
    return check_against_oracle(
        student, teacher, divergence, options, backend="triton", slack=SLACK, **kwargs
    )


# ----------------------------------------------------------------------------- vs the float64 reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_matches_reference(case, dtype, seed):
    divergence, options = case
    shape = (3, 5, 1271)
    student, teacher = logits(shape, dtype, seed, scale=SCALE)
    check(student, teacher, divergence, options, reduction="none", weight=randn(shape[:-1], seed + 2))


@pytest.mark.parametrize("case", DIVERGENCE_CASES[::3], ids=CASE_IDS[::3])
def test_matches_reference_float16(case, seed):
    divergence, options = case
    shape = (3, 5, 1271)
    student, teacher = logits(shape, torch.float16, seed, scale=SCALE)
    check(student, teacher, divergence, options, reduction="none", weight=randn(shape[:-1], seed + 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_matches_reference_reduced_with_labels_and_temperature(case, reduction, dtype, seed):
    divergence, options = case
    shape = (3, 5, 1271)
    student, teacher = logits(shape, dtype, seed, scale=SCALE)
    labels = labels_for(shape[:-1], seed)
    check(student, teacher, divergence, options, reduction=reduction, temperature=2.5, labels=labels)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_multi_tile_vocabulary(case, seed):
    """V = 4133: two 4096-entry tiles, the second mostly masked (the online log-sum-exp rescales)."""
    divergence, options = case
    student, teacher = logits((4, 4133), torch.float32, seed, scale=SCALE)
    labels = labels_for((4,), seed)
    check(
        student,
        teacher,
        divergence,
        options,
        reduction="none",
        weight=randn(4, seed + 2),
        temperature=1.7,
        labels=labels,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_multi_tile_vocabulary_other_dtypes(case, dtype, seed):
    """float64 tiles hold 2048 entries: V = 4133 is three of them."""
    divergence, options = case
    student, teacher = logits((3, 4133), dtype, seed, scale=SCALE)
    check(student, teacher, divergence, options, reduction="none", weight=randn(3, seed + 2), temperature=0.8)


@pytest.mark.parametrize(
    ("vocab", "dtype"),
    [(1, torch.float32), (17, torch.float32), (4096, torch.float32), (4097, torch.float32)]
    + [(2048, torch.float64), (2049, torch.float64)],
    ids=["1", "17", "4096", "4097", "2048-f64", "2049-f64"],
)
@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_vocab_sizes_at_tile_edges(case, vocab, dtype, seed):
    """V = 1 (a zero loss), below the 16-entry minimum tile, and one entry either side of a whole tile."""
    divergence, options = case
    student, teacher = logits((3, vocab), dtype, seed, scale=SCALE)
    loss, _ = check(
        student,
        teacher,
        divergence,
        options,
        reduction="none",
        weight=randn(3, seed + 2),
        temperature=1.3,
        labels=labels_for((3,), seed),
    )
    if vocab == 1:  # p = q = 1: zero up to rounding (log-mixture terms)
        assert (loss.abs() <= 1e-6).all()


@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_non_contiguous_inputs(case, seed):
    """Row strides larger than V, different for student and teacher, and permuted leading dimensions."""
    divergence, options = case
    base_s, base_t = logits((4, 3, 700), torch.float32, seed, scale=SCALE)
    weight = randn((3, 4), seed + 2)
    student = base_s[..., 5:650].transpose(0, 1)  # (3, 4, 645): reshaped into contiguous rows
    teacher = base_t[..., 40:685].transpose(0, 1)
    check(student, teacher, divergence, options, reduction="none", weight=weight, temperature=0.7)
    student, teacher = base_s[..., 5:650], base_t[:, :, 40:685]  # a [12, 645] view with row stride 700
    check(student, teacher, divergence, options, reduction="none", weight=weight.T, temperature=0.7)


def test_empty_batch():
    student = torch.zeros(0, 3, 11, device=DEVICE, requires_grad=True)
    loss = fdistill.divergence_loss(student, torch.zeros(0, 3, 11, device=DEVICE), "jsd", backend="triton")
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad.shape == (0, 3, 11)


@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_raw_ops_contract(case, seed):
    """Loss, statistics and gradient of the raw ops; the backward takes a strided or stride-0 grad_loss."""
    divergence, options = case
    param = param_of(divergence, options)
    student, teacher = logits((8, 129), torch.float64, seed)
    labels = labels_for((8,), seed)
    fwd, bwd = torch.ops.fdistill.divergence_fwd_triton, torch.ops.fdistill.divergence_bwd_triton
    loss, stats = fwd(student, teacher, labels, divergence, param, 1.5, -100)
    assert loss.shape == (8,) and loss.dtype == torch.float64
    assert stats.shape == (8, NUM_STATS) and stats.dtype == torch.float64
    want = reference_rows64(student, teacher, divergence, param, 1.5, labels)
    assert_close_verbose(loss, want, 1e-12, 1e-12, "loss")
    keep = labels != -100
    assert_stats_hold_lse(stats, student, teacher, keep, 1.5, 1e-12)
    s = student.clone().requires_grad_(True)
    upstream = randn((8, 3), seed, torch.float64)[:, 1]  # stride 3
    (autograd,) = torch.autograd.grad(fwd(s, teacher, labels, divergence, param, 1.5, -100)[0], s, upstream)
    grad = bwd(upstream, student, teacher, labels, stats, divergence, param, 1.5, -100)
    assert grad.shape == student.shape and grad.dtype == student.dtype and grad.is_contiguous()
    assert torch.equal(grad, autograd)
    assert (grad[~keep] == 0).all()
    expanded = torch.tensor(0.7, dtype=torch.float64, device=DEVICE).expand(8)  # stride 0
    full = torch.full((8,), 0.7, dtype=torch.float64, device=DEVICE)
    assert torch.equal(
        bwd(expanded, student, teacher, labels, stats, divergence, param, 1.5, -100),
        bwd(full, student, teacher, labels, stats, divergence, param, 1.5, -100),
    )


# ----------------------------------------------------------------------------- Triton vs the CPU kernel


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_agrees_with_cpu_kernel(case, seed):
    """float32: the two fused kernels agree to ~1e-6 relative (loss and gradient) on random inputs."""
    divergence, options = case
    student, teacher = make_logits((4, 3, 2500), torch.float32, scale=SCALE, seed=seed)
    labels = make_labels((4, 3), seed)
    weight = seeded_randn((4, 3), seed + 2)
    cpu, tri = check_triton_agrees_with_cpu(
        student,
        teacher,
        divergence,
        options,
        weight,
        tol=1e-6 * SLACK * SLACK,
        device=DEVICE,
        temperature=1.3,
        labels=labels,
    )
    assert ((tri[0] == 0) == (cpu[0] == 0)).all(), "ignored rows are 0 in both"


# ----------------------------------------------------------------------------- -inf, ties and special rows


def _case_dtype_params(extra_dtype, extra_cases):
    for case in DIVERGENCE_CASES:
        yield pytest.param(case, torch.float32, id=f"{case_id(case)}-f32")
    for case in extra_cases:
        yield pytest.param(case, extra_dtype, id=f"{case_id(case)}-{str(extra_dtype).removeprefix('torch.')}")


@pytest.mark.parametrize(("case", "dtype"), list(_case_dtype_params(torch.bfloat16, SECTION)))
def test_shared_neg_inf_mask(case, dtype, seed):
    """-inf at the same entries of student and teacher (masked vocabulary): as the reference does."""
    divergence, options = case
    student, teacher = logits((2, 3, 1000), dtype, seed, scale=SCALE, neg_inf_frac=0.3)
    _, grad = check(student, teacher, divergence, options, reduction="none", weight=randn((2, 3), seed))
    assert (grad[torch.isneginf(student)] == 0).all(), "masked entries must get a zero gradient"


def _one_sided_params():
    for side in ("teacher", "student"):
        for case in DIVERGENCE_CASES:
            yield pytest.param(side, case, id=f"{side}-{case_id(case)}")


@pytest.mark.parametrize(("side", "case"), list(_one_sided_params()))
def test_one_sided_neg_inf(side, case, seed):
    """-inf on one side only: the loss (finite or +inf) as the reference; the gradient where it is finite."""
    divergence, options = case
    student, teacher = logits((4, 300), torch.float64, seed, scale=SCALE)
    weight = randn(4, seed, torch.float64)
    check_one_sided_neg_inf(
        student, teacher, side, divergence, options, weight, backend="triton", slack=SLACK
    )


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_neg_inf_whole_tiles(case, seed):
    """V = 4133 (two tiles): a row whose first tile is all -inf (the online sums start from an empty
    prefix), one whose second tile is, and the same one-sided (student or teacher only)."""
    divergence, options = case
    student, teacher = logits((7, 4133), torch.float32, seed, scale=SCALE)
    student[0, :4096], teacher[0, :4096] = -INF, -INF  # shared, first tile
    student[1, 4096:], teacher[1, 4096:] = -INF, -INF  # shared, second tile
    student[2, 3000:4100], teacher[2, 3000:4100] = -INF, -INF  # shared, across the tile edge
    student[3, :4096] = -INF  # one-sided
    teacher[4, :4096] = -INF
    student[5, 4096:] = -INF
    teacher[6, 4096:] = -INF
    weight = randn(7, seed + 2)
    loss, grad = loss_and_grad(student, teacher, divergence, options, "none", weight, backend="triton")
    want_loss, want_grad = oracle_loss_and_grad(student, teacher, divergence, options, "none", weight)
    loss_atol, loss_rtol, grad_atol, grad_rtol = tolerances(torch.float32, SLACK)
    assert_close_verbose(loss, want_loss, loss_atol, loss_rtol, "loss")
    finite = torch.isfinite(want_loss)
    assert finite[:3].all()
    gscale = max(want_grad[finite].abs().max().item(), weight.abs().max().item())
    assert_close_verbose(grad[finite], want_grad[finite], grad_atol * gscale, grad_rtol, "grad (finite rows)")
    assert (grad[:3][torch.isneginf(student[:3])] == 0).all(), "masked entries must get a zero gradient"


@pytest.mark.parametrize(
    ("dtype", "vocab"),
    [(torch.float32, 777), (torch.bfloat16, 777), (torch.float64, 777), (torch.float32, 4133)],
    ids=["f32", "bf16", "f64", "f32-two-tiles"],
)
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_ties_give_zero(case, dtype, vocab, seed):
    """Identical student and teacher, and constant rows: loss 0 and gradient 0 for every divergence."""
    divergence, options = case
    base, _ = make_logits((2, vocab), dtype, scale=SCALE, seed=seed)
    check_ties_give_zero(base, divergence, options, randn(4, seed), backend="triton", slack=SLACK)


def _special_rows(dtype, vocab, seed, col):
    """Rows 0-6 special (see test_special_rows_only_poison_their_row), rows 7-9 clean, on DEVICE."""
    inputs = special_rows_logits(dtype, vocab, seed, student_nan=col, teacher_nan=col // 2, student_inf=col)
    return tuple(x.to(DEVICE) for x in inputs)


def _special_rows_params():
    for case in DIVERGENCE_CASES:
        yield pytest.param(case, torch.float32, 203, 100, id=f"{case_id(case)}-f32")
    for case in SECTION:  # the bad entries in the second tile
        yield pytest.param(case, torch.float32, 4133, 4100, id=f"{case_id(case)}-f32-two-tiles")
    for case in DIVERGENCE_CASES[::3]:
        for dtype, name in ((torch.float64, "f64"), (torch.bfloat16, "bf16"), (torch.float16, "f16")):
            yield pytest.param(case, dtype, 203, 100, id=f"{case_id(case)}-{name}")


@pytest.mark.parametrize(("case", "dtype", "vocab", "col"), list(_special_rows_params()))
def test_special_rows_only_poison_their_row(case, dtype, vocab, col, seed):
    """Padding rows (all -inf) give 0 / 0; one-sided empty, NaN or +inf rows give NaN, nothing else does."""
    divergence, options = case
    weight = (torch.rand(10, generator=generator(seed)) + 0.5).to(DEVICE)
    check_special_rows(*_special_rows(dtype, vocab, seed, col), divergence, options, weight, backend="triton")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_all_tokens_ignored(case, reduction, seed):
    divergence, options = case
    student, teacher = logits((2, 3, 64), torch.float32, seed, scale=SCALE)
    check_all_tokens_ignored(student, teacher, divergence, options, reduction, backend="triton")


@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_ignored_rows_with_garbage_do_not_leak(case, seed):
    """NaN / inf / all -inf garbage in ignored rows: same loss and gradient as with clean rows there."""
    divergence, options = case
    student, teacher = logits((2, 4, 129), torch.bfloat16, seed, scale=SCALE)
    labels = labels_for((2, 4), seed)
    weight = randn((2, 4), seed)
    check_ignored_rows_with_garbage(student, teacher, labels, divergence, options, weight, backend="triton")


# KL(q || p) and the divergences that resolve to it (jeffreys beta=1, jsd beta=1, skew_reverse_kl skew=0)
@pytest.mark.parametrize("kind", ["offset", "scale100"])
def test_large_logits_two_x_eager_rule(kind, seed):
    """err(Triton fp32 vs ref64) <= 2 err(reference in fp32 vs ref64) + small atol, loss and gradient.

    One test per input kind over every divergence (the failures are listed together).
    """
    student, teacher = large_inputs(kind, seed)
    weight = torch.randn(6)
    args = (student.to(DEVICE), teacher.to(DEVICE), weight.to(DEVICE), "triton")
    bad = two_x_eager_violations(*args, slack=SLACK, cases=LARGE_CASES)
    assert not bad, "Triton error beyond the 2x-eager rule:\n" + "\n".join(
        f"{k}: {v}" for k, v in bad.items()
    )


def test_large_logits_reverse_kl_gradient_as_accurate_as_cpu_kernel():
    """Scale-100 logits (fixed input): Triton's reverse-KL gradient error <= 2 x the C++ kernel's + 4 eps."""
    student, teacher = make_logits((6, 1271), torch.float32, scale=100.0, seed=4)
    weight = torch.ones(6)
    _, want = oracle_loss_and_grad(student, teacher, "reverse_kl", {}, "none", weight)
    _, cpu = loss_and_grad(student, teacher, "reverse_kl", {}, "none", weight, backend="cpu")
    kwargs = {"backend": "triton"}
    _, tri = loss_and_grad(
        student.to(DEVICE), teacher.to(DEVICE), "reverse_kl", {}, "none", weight.to(DEVICE), **kwargs
    )
    tri_err, cpu_err = max_abs_err(tri.cpu(), want), max_abs_err(cpu, want)
    atol = 4 * torch.finfo(torch.float32).eps * SLACK * max(1.0, want.abs().max().item())  # the 2x-eager atol
    assert tri_err <= 2 * cpu_err + atol, (
        f"Triton {tri_err:.2e} vs C++ kernel {cpu_err:.2e} (atol {atol:.1e})"
    )


def test_large_opposite_offsets_forward_kl(seed):
    student, teacher = opposite_offset_logits(seed, DEVICE)
    loss = fdistill.divergence_loss(student, teacher, "forward_kl", reduction="none", backend="triton")
    eager = fdistill.divergence_loss(student, teacher, "forward_kl", reduction="none", backend="reference")
    want = reference_rows64(student, teacher, "forward_kl", 0.0)
    err = (loss.double() - want).abs().max().item()
    assert (
        err <= 2 * (eager.double() - want).abs().max().item() + 4 * 1.2e-7 * SLACK * want.abs().max().item()
    )


# ----------------------------------------------------------------------------- backend choice and options


def test_backend_choice_records_the_triton_op(seed):
    student, teacher = logits((3, 5, 300), torch.float32, seed, scale=SCALE)
    labels = labels_for((3, 5), seed)
    with OpRecorder() as rec:
        got = fdistill.divergence_loss(student, teacher, "tv", labels=labels, backend="triton")
    assert "fdistill.divergence_fwd_triton.default" in rec.names, rec.names
    if not ON_CUDA:  # CPU tensors: the default is the C++ kernel, even with the interpreter enabled
        with OpRecorder() as rec:
            default = fdistill.divergence_loss(student, teacher, "tv", labels=labels)
        assert "fdistill.divergence_fwd.default" in rec.names and not any("triton" in n for n in rec.names)
        assert_close_verbose(got, default, 1e-6, 1e-6, "triton vs default (cpu)")


@pytest.mark.parametrize("case", SECTION[::2], ids=SECTION_IDS[::2])
def test_scale_by_temperature_squared_and_module(case, seed):
    divergence, options = case
    student, teacher = logits((3, 4, 200), torch.float64, seed, scale=SCALE)
    plain = check_scale_by_temperature_squared(student, teacher, divergence, options, backend="triton")
    module = fdistill.DivergenceLoss(divergence, **options, temperature=3.0, backend="triton")
    assert torch.equal(module(student, teacher), plain[0])


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8])
def test_integer_labels_and_custom_ignore_index(label_dtype, seed):
    student, teacher = logits((3, 5, 80), torch.float32, seed, scale=SCALE)
    labels = make_labels((3, 5), seed, ignore_index=7, vocab=50).to(DEVICE)
    kwargs = {"labels": labels, "ignore_index": 7}
    want = loss_and_grad(student, teacher, "jsd", {}, "mean", backend="triton", **kwargs)
    kwargs["labels"] = labels.to(label_dtype)
    got = loss_and_grad(student, teacher, "jsd", {}, "mean", backend="triton", **kwargs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[1][labels == 7] == 0).all() and (got[1][labels != 7] != 0).any()


def test_double_backward_raises(seed):
    student, teacher = logits((3, 40), torch.float64, seed, scale=SCALE)
    s = student.clone().requires_grad_(True)
    loss = fdistill.divergence_loss(s, teacher, "forward_kl", backend="triton")
    with pytest.raises((RuntimeError, NotImplementedError), match="second derivative|double backward"):
        (g,) = torch.autograd.grad(loss, s, create_graph=True)  # the one-pass backward raises here
        torch.autograd.grad((g * g).sum(), s)


# ----------------------------------------------------------------------------- opcheck and torch.compile


def _triton_ops():
    fdistill.divergence_loss(*logits((1, 4)), backend="triton")  # registers the ops (lazily imported)
    return torch.ops.fdistill.divergence_fwd_triton, torch.ops.fdistill.divergence_bwd_triton


_NAN_STATS_BUG = (
    "BUG: divergence_fwd_triton leaves NaN in stats[:, 4:6] (c0, c1) of ignored rows (label == "
    "ignore_index) and of all -inf rows for divergence='alpha' (lse_z = -inf - -inf); the C++ op writes 0. "
    "opcheck's test_aot_dispatch_dynamic then fails: its eager vs traced comparison has NaN != NaN"
)


def _opcheck_forward_params():
    for divergence, param in OPCHECK_CASES:
        for dtype, labelled in ((torch.float32, False), (torch.float64, True)):
            marks = []
            name = f"{divergence}-{'f64-labels' if labelled else 'f32-nolabels'}"
            yield pytest.param(divergence, param, dtype, labelled, marks=marks, id=name)


@pytest.mark.parametrize(("divergence", "param", "dtype", "labelled"), list(_opcheck_forward_params()))
def test_opcheck_forward(divergence, param, dtype, labelled, seed):
    fwd, _ = _triton_ops()
    opcheck_forward(fwd, divergence, param, dtype, labelled, seed, DEVICE)


@pytest.mark.parametrize(("divergence", "param", "dtype", "labelled"), list(_opcheck_forward_params()))
def test_opcheck_forward_grad(divergence, param, dtype, labelled, seed):
    _triton_ops()
    fwd_grad = torch.ops.fdistill.divergence_fwd_grad_triton
    opcheck_forward_grad(fwd_grad, divergence, param, dtype, labelled, seed, DEVICE)


@pytest.mark.parametrize(("divergence", "param"), OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_one_pass_kernel_matches_cpu_one_pass(divergence, param, seed):
    """The Triton one-pass op (WRITE_GRAD) gives the C++ one-pass op's loss, statistics and gradient,
    with ignored rows, -inf entries and an odd V."""
    student, teacher = make_logits((5, 1271), torch.float64, scale=4.0, seed=seed)
    student[1, :7] = float("-inf")
    labels = make_labels((5,), seed)
    labels[2] = -100
    _triton_ops()
    args = (student.to(DEVICE), teacher.to(DEVICE), labels.to(DEVICE), divergence, param, 0.8, -100, 0.37)
    got = torch.ops.fdistill.divergence_fwd_grad_triton(*args)
    want = torch.ops.fdistill.divergence_fwd_grad(student, teacher, labels, *args[3:])
    kept = labels != -100  # ignored rows' statistics differ by design (Triton: -inf log-sums, C++: 0)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g = g.cpu()
        if i == 1:
            g, w = g[kept], w[kept]
        torch.testing.assert_close(g, w, atol=1e-13, rtol=1e-11, equal_nan=True)


@pytest.mark.parametrize(
    ("dtype", "labelled"), [(torch.float32, False), (torch.float64, True)], ids=["f32-nolabels", "f64-labels"]
)
@pytest.mark.parametrize(("divergence", "param"), OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_backward(divergence, param, dtype, labelled, seed):
    fwd, bwd = _triton_ops()
    opcheck_backward(fwd, bwd, divergence, param, dtype, labelled, seed, DEVICE)


def test_compile_aot_eager_fullgraph(fresh_dynamo, seed):
    def loss_fn(s, t, labels):
        return fdistill.divergence_loss(
            s,
            t,
            "jsd",
            beta=0.3,
            labels=labels,
            temperature=2.0,
            scale_by_temperature_squared=True,
            backend="triton",
        )

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    # the second batch size: dynamic shapes in the fakes
    compiled_vs_eager(compiled, loss_fn, [(2, 3, 257), (5, 3, 257)], torch.float32, seed, DEVICE)


# ----------------------------------------------------------------------------- bad input

_NO_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch, fdistill
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    try:
        fdistill.divergence_loss(s, t, backend="triton")
    except ValueError as e:
        print("ValueError:", e)
    else:
        print("no error")
    """
)


def test_cpu_tensors_without_interpreter_are_refused():
    """backend="triton" on CPU tensors without TRITON_INTERPRET=1: a ValueError that names the variable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip()
    assert out.startswith("ValueError:"), out
    assert "TRITON_INTERPRET" in out and "backend='triton'" in out, out


def test_grad_teacher_with_triton_backend_is_refused(seed):
    student, teacher = logits((2, 5), torch.float32, seed)
    with pytest.raises(ValueError, match="grad_teacher"):
        fdistill.divergence_loss(student, teacher.requires_grad_(True), grad_teacher=True, backend="triton")
    with pytest.raises(ValueError, match="grad_teacher"):
        fdistill.divergence_loss(student, teacher.detach(), grad_teacher=True, backend="triton")


def test_mismatched_devices_and_shapes_are_refused(seed):
    student, teacher = logits((2, 3, 10), torch.float32, seed)
    with pytest.raises(ValueError, match="same shape"):
        fdistill.divergence_loss(student, teacher[..., :9], backend="triton")
    with pytest.raises(TypeError, match="same dtype"):
        fdistill.divergence_loss(student, teacher.double(), backend="triton")
    with pytest.raises(ValueError, match="labels"):
        fdistill.divergence_loss(
            student, teacher, labels=torch.zeros(2, 4, dtype=torch.long, device=DEVICE), backend="triton"
        )
