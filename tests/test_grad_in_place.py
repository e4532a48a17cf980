"""grad_in_place=True: the backward writes the student gradient over the student logits.

For the fused backends ("cpu", and "triton": CUDA, or CPU tensors under the Triton interpreter that
conftest.py enables without a GPU) the in-place backward runs the same kernel as the out-of-place
one, so the gradient must be bit for bit the same, and the logits must hold it afterwards.
"""

from __future__ import annotations

import pytest
import torch
from utils import (
    DIVERGENCE_CASES,
    INF,
    SECTION,
    SECTION_IDS,
    SKIP_WITHOUT_TRITON,
    TRITON_DEVICE,
    TRITON_INTERPRETER_WARNINGS,
    assert_close_verbose,
    case_id,
    make_labels,
    make_logits,
    opcheck_backward,
    param_of,
    randn,
    run_linear_head,
)

import fdistill
from fdistill._triton_dispatch import triton_forward_op

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton", marks=SKIP_WITHOUT_TRITON)]

pytestmark = TRITON_INTERPRETER_WARNINGS


def device_of(backend: str) -> torch.device:
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def _in_place_params():
    for backend in BACKENDS:
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float64] if backend.values[0] == "cpu" else [])
        for dtype in dtypes:
            for case in DIVERGENCE_CASES:
                name = f"{backend.id}-{str(dtype).removeprefix('torch.')}-{case_id(case)}"
                yield pytest.param(backend.values[0], dtype, case, id=name, marks=backend.marks)


@pytest.mark.parametrize(("backend", "dtype", "case"), list(_in_place_params()))
def test_in_place_equals_out_of_place(backend, dtype, case, seed):
    """Same loss, same gradient bit for bit (to the logits and on through the matmul to W); the logits
    tensor holds the gradient afterwards; ignored rows get (and hold) zeros."""
    divergence, options = case
    device = device_of(backend)
    vocab = 300
    h = randn((6, 16), seed, dtype, device)
    w = randn((16, vocab), seed + 1, dtype, device)
    _, teacher = make_logits((2, 3, vocab), dtype, scale=2.5, seed=seed)
    teacher = teacher.to(device)
    labels = make_labels((2, 3), seed).to(device)
    weight = randn((2, 3), seed + 2, device=device)
    kwargs = {"labels": labels, "temperature": 1.3, "reduction": "none", "weight": weight}
    loss, logits, grad, grad_w = run_linear_head(backend, False, h, w, teacher, divergence, options, **kwargs)
    loss_ip, logits_ip, grad_ip, grad_w_ip = run_linear_head(
        backend, True, h, w, teacher, divergence, options, **kwargs
    )
    assert torch.equal(loss_ip, loss)
    # the out-of-place gradient comes from the one-pass op (unit upstream gradient, then scaled): one
    # more rounding than the in-place (two-pass) one, which applies the upstream factor per entry
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-7, "rtol": 1e-5}
    if dtype == torch.bfloat16:  # two bf16 roundings (the unit gradient, then its scaled value): 2 ulp
        tol = {"atol": 1e-6, "rtol": 2**-6}
    assert grad_ip.dtype == dtype
    torch.testing.assert_close(grad_ip, grad, **tol)  # in place (two passes) vs out of place (one pass)
    assert torch.equal(logits_ip, grad_ip), "the student logits must hold the gradient after the backward"
    assert not torch.equal(logits, grad), "the out-of-place backward must leave the logits alone"
    # dW = h^T dz sums entries that cancel: compare it on the scale of its largest entry
    scale = grad_w.abs().max().item()
    torch.testing.assert_close(grad_w_ip, grad_w, atol=tol["rtol"] * 4 * scale, rtol=0)
    assert (grad_ip[labels == -100] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_in_place_leaf_student_with_reductions(case, backend, reduction, seed):
    """A leaf student and a reduced loss (a stride-0 upstream gradient): .grad as out of place; the
    leaf's data is the gradient afterwards; the teacher is untouched."""
    divergence, options = case
    device = device_of(backend)
    student, teacher = make_logits((3, 4, 257), torch.float32, scale=2.5, seed=seed)
    student, teacher = student.to(device), teacher.to(device)
    labels = make_labels((3, 4), seed).to(device)
    teacher_copy = teacher.clone()
    grads = []
    for grad_in_place in (False, True):
        s = student.clone().requires_grad_(True)
        loss = fdistill.divergence_loss(
            s,
            teacher,
            divergence,
            **options,
            labels=labels,
            reduction=reduction,
            temperature=2.5,
            backend=backend,
            grad_in_place=grad_in_place,
        )
        loss.backward()
        grads.append((loss.detach(), s.grad, s.detach()))
    (loss, grad, data), (loss_ip, grad_ip, data_ip) = grads
    assert torch.equal(loss_ip, loss)  # the one-pass gradient (out of place) rounds the 1/N apart:
    torch.testing.assert_close(grad_ip, grad, atol=1e-8, rtol=1e-5)
    assert torch.equal(data, student) and torch.equal(data_ip, grad_ip)
    assert torch.equal(teacher, teacher_copy)


def test_default_backend_on_cpu_accepts_grad_in_place(seed):
    student, teacher = make_logits((4, 100), torch.float32, seed=seed)
    s = student.clone().requires_grad_(True)
    fdistill.divergence_loss(s, teacher, "jsd", grad_in_place=True).backward()
    want = student.clone().requires_grad_(True)
    fdistill.divergence_loss(want, teacher, "jsd", backend="cpu").backward()
    assert torch.equal(s.grad, want.grad) and torch.equal(s.detach(), want.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_in_place_non_contiguous_student(case, backend, seed):
    """Strided students still get the right gradient: a [rows, V] view with row stride > V is written in
    place (and nothing outside the view is touched); permuted leading dimensions need a copy."""
    divergence, options = case
    device = device_of(backend)
    base_s, base_t = make_logits((4, 3, 300), torch.float32, scale=2.5, seed=seed)
    base_s, base_t = base_s.to(device), base_t.to(device)
    weight = randn((4, 3), seed + 2, device=device)
    views = (
        (lambda x: x[..., 5:260], weight),  # reshapes to a [12, 255] view with row stride 300
        (lambda x: x[..., 5:260].transpose(0, 1), weight.T),  # reshapes to a copy
    )
    for view, upstream in views:
        results = []
        for grad_in_place in (False, True):
            base = base_s.clone().requires_grad_(True)
            student = view(base)
            loss = fdistill.divergence_loss(
                student,
                view(base_t),
                divergence,
                **options,
                reduction="none",
                temperature=0.7,
                backend=backend,
                grad_in_place=grad_in_place,
            )
            (loss * upstream).sum().backward()
            results.append((base.grad, base.detach()))
        (grad, _), (grad_ip, data_ip) = results
        torch.testing.assert_close(grad_ip, grad, atol=1e-7, rtol=1e-5)  # in place vs one pass, strided
        outside = torch.ones_like(base_s, dtype=torch.bool)
        outside[..., 5:260] = False
        assert torch.equal(data_ip[outside], base_s[outside]), "entries outside the student view were written"


_EXPANDED_BUG = (
    "BUG: grad_in_place=True with a student whose rows share memory (stride 0, e.g. one student row "
    "expanded against several teachers) writes each row's gradient over logits the next rows still read: "
    "silently wrong gradients. _as_rows() keeps such a view since its last stride is 1; it should copy "
    "(or the backward should fall back to out of place) when rows overlap"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_student_with_overlapping_rows(backend, seed):
    device = device_of(backend)
    student, teacher = make_logits((4, 50), torch.float32, seed=seed)
    student, teacher = student[:1].to(device), teacher.to(device)
    grads = []
    for grad_in_place in (False, True):
        s = student.clone().requires_grad_(True)
        fdistill.divergence_loss(
            s.expand(4, 50),
            teacher,
            "forward_kl",
            reduction="sum",
            backend=backend,
            grad_in_place=grad_in_place,
        ).backward()
        grads.append(s.grad)
    assert_close_verbose(grads[1], grads[0], 1e-6, 1e-6, "expanded student, in place vs out of place")


_VERSION_BUG = (
    "BUG: the in-place backward ops (divergence_bwd_ / divergence_bwd_triton_, schema Tensor(a!) student) "
    "do not bump the student's version counter, so autograd cannot see that the logits were overwritten: "
    "a loss that saved the logits for its own backward (here a z-loss, logsumexp(logits)^2) silently "
    "gets the gradient instead of the logits. Expected: 'modified by an inplace operation' RuntimeError"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_overwrite_of_logits_saved_elsewhere_is_detected(backend, seed):
    device = device_of(backend)
    student, teacher = make_logits((4, 50), torch.float32, seed=seed)
    student, teacher = student.to(device), teacher.to(device)

    def grad(grad_in_place):
        s = student.clone().requires_grad_(True)
        z_loss = torch.logsumexp(s, -1).pow(2).mean()  # saves s; runs after the divergence's backward
        kd = fdistill.divergence_loss(s, teacher, backend=backend, grad_in_place=grad_in_place)
        (z_loss + kd).backward()
        return s.grad

    want = grad(False)
    try:
        got = grad(True)
    except RuntimeError as e:
        assert "inplace" in str(e)
        return
    assert_close_verbose(got, want, 1e-6, 1e-6, "z-loss + in-place divergence")


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_in_place_op_bumps_version(backend, seed):
    fwd, _, bwd_ = _ops(backend)
    student, teacher = make_logits((3, 40), torch.float32, seed=seed)
    student, teacher = student.to(device_of(backend)), teacher.to(device_of(backend))
    _, stats = fwd(student, teacher, None, "tv", 0.0, 1.0, -100)
    before = student._version
    bwd_(torch.ones(3, device=student.device), student, teacher, None, stats, "tv", 0.0, 1.0, -100)
    assert student._version > before


def test_reference_backend_rejects_grad_in_place(seed):
    student, teacher = make_logits((2, 3, 10), torch.float32, seed=seed)
    with pytest.raises(ValueError, match="grad_in_place"):
        fdistill.divergence_loss(student, teacher, backend="reference", grad_in_place=True)
    with pytest.raises(ValueError, match="grad_in_place"):  # grad_teacher picks the reference backend
        fdistill.divergence_loss(student, teacher.requires_grad_(True), grad_teacher=True, grad_in_place=True)
    with pytest.raises(ValueError, match="grad_in_place"):
        fdistill.DivergenceLoss("jsd", backend="reference", grad_in_place=True)(student, teacher.detach())


# ----------------------------------------------------------------------------- the raw in-place ops


def _ops(backend):
    if backend == "cpu":
        return (
            torch.ops.fdistill.divergence_fwd,
            torch.ops.fdistill.divergence_bwd,
            torch.ops.fdistill.divergence_bwd_,
        )
    triton_forward_op()  # imports fdistill.triton, which registers the Triton ops
    ops = torch.ops.fdistill
    return ops.divergence_fwd_triton, ops.divergence_bwd_triton, ops.divergence_bwd_triton_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_raw_in_place_op_writes_the_out_of_place_values(case, backend, dtype, seed):
    """divergence_bwd_ / divergence_bwd_triton_ return None and write exactly what divergence_bwd /
    divergence_bwd_triton return, into a [rows, V] view with row stride > V (the gaps untouched), with
    labels, a special row and a stride-0 grad_loss."""
    divergence, options = case
    param = param_of(divergence, options)
    device = device_of(backend)
    fwd, bwd, bwd_ = _ops(backend)
    base_s, base_t = make_logits((6, 140), dtype, scale=2.5, seed=seed)
    base_s[1, :] = -INF  # no student distribution: a NaN row
    base_s, base_t = base_s.to(device), base_t.to(device)
    student, teacher = base_s[:, 3:131], base_t[:, 7:135]  # row strides 140
    labels = make_labels((6,), seed).to(device)
    labels[1] = 5
    for grad_loss in (randn(6, seed, device=device), torch.tensor(0.4, device=device).expand(6)):
        _, stats = fwd(student, teacher, labels, divergence, param, 1.7, -100)
        args = (teacher, labels, stats, divergence, param, 1.7, -100)
        want = bwd(grad_loss, student, *args)
        target = base_s.clone()
        view = target[:, 3:131]
        assert bwd_(grad_loss, view, *args) is None
        assert_close_verbose(view, want, 0, 0, "in-place op vs out-of-place op")  # NaN row included
        assert torch.isnan(view[1]).all()
        assert torch.equal(target[:, :3], base_s[:, :3]) and torch.equal(target[:, 131:], base_s[:, 131:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "param"), [("forward_kl", 0.0), ("jsd", 0.3), ("alpha", 1.5)])
def test_opcheck_in_place_backward(divergence, param, backend, seed):
    fwd, _, bwd_ = _ops(backend)
    opcheck_backward(fwd, bwd_, divergence, param, torch.float32, True, seed, device_of(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_aot_eager_with_grad_in_place(backend, fresh_dynamo, seed):
    """Under torch.compile the gradient is right (whether the logits are reused is up to AOTAutograd)."""
    device = device_of(backend)

    def head_loss(h, w, teacher, labels):
        logits = (h @ w).view(teacher.shape)
        return fdistill.divergence_loss(
            logits, teacher, "jsd", beta=0.3, labels=labels, backend=backend, grad_in_place=True
        )

    compiled = torch.compile(head_loss, backend="aot_eager", fullgraph=True)
    h, w = randn((6, 16), seed, device=device), randn((16, 129), seed + 1, device=device)
    _, teacher = make_logits((2, 3, 129), torch.float32, seed=seed)
    teacher, labels = teacher.to(device), make_labels((2, 3), seed).to(device)
    grads = []
    for fn in (compiled, head_loss):
        w_ = w.clone().requires_grad_(True)
        fn(h, w_, teacher, labels).backward()
        grads.append(w_.grad)
    assert_close_verbose(grads[0], grads[1], 1e-6, 1e-6, "W.grad compiled vs eager")
