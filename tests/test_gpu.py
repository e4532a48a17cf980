"""The Triton kernels on a CUDA GPU, at LLM vocabulary sizes (skipped without a GPU).

The comparison (:func:`gpu_checks.check_gpu`) is shared with tests/test_gpu_math.py, which runs the
same checks under the Triton interpreter with the GPU's approximate exp / log / divide / sqrt
imitated, so the margins are known before a GPU is lent.
"""

from __future__ import annotations

import pytest
import torch
from gpu_checks import LOSS_TOL, check_gpu
from utils import (
    CASE_IDS,
    DIVERGENCE_CASES,
    INF,
    NAN,
    SCALE,
    SECTION,
    SECTION_IDS,
    OpRecorder,
    assert_close_verbose,
    check_special_rows,
    check_triton_agrees_with_cpu,
    compiled_vs_eager,
    loss_and_grad,
    make_labels,
    make_logits,
    opcheck_backward,
    opcheck_forward,
    randn,
    run_linear_head,
)

import fdistill
from fdistill._triton_dispatch import triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
]

CUDA = torch.device("cuda")


def cuda_logits(shape, dtype, seed, **kwargs):
    return make_logits(shape, dtype, scale=kwargs.pop("scale", SCALE), seed=seed, device=CUDA, **kwargs)


def cuda_randn(shape, seed):
    return randn(shape, seed, device=CUDA)


def test_default_backend_on_cuda_is_triton(seed):
    student, teacher = cuda_logits((4, 3, 1000), torch.float32, seed)
    labels = make_labels((4, 3), seed).to(CUDA)
    with OpRecorder() as rec:
        default = fdistill.divergence_loss(student, teacher, "jsd", labels=labels)
    assert "fdistill.divergence_fwd_triton.default" in rec.names, rec.names
    assert torch.equal(
        default, fdistill.divergence_loss(student, teacher, "jsd", labels=labels, backend="triton")
    )
    with pytest.raises(ValueError, match="CPU tensors"):
        fdistill.divergence_loss(student, teacher, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_llama3_vocabulary_matches_reference(case, dtype, seed):
    """(8, 128256): the Llama 3 vocabulary, 32 tiles of 4096 (the last one partial)."""
    divergence, options = case
    student, teacher = cuda_logits((8, 128256), dtype, seed)
    check_gpu(student, teacher, divergence, options, weight=cuda_randn(8, seed + 2))


@pytest.mark.parametrize(
    "case",
    [
        ("forward_kl", {}),
        ("jsd", {"beta": 0.5}),
        ("skew_reverse_kl", {"skew": 0.1}),
        ("alpha", {"alpha": 0.5}),
    ],
    ids=["forward_kl", "jsd", "skew_reverse_kl", "alpha"],
)
def test_gemma_vocabulary_matches_reference(case, seed):
    """(2, 262144) float32, with temperature: 64 full tiles."""
    divergence, options = case
    student, teacher = cuda_logits((2, 262144), torch.float32, seed)
    check_gpu(student, teacher, divergence, options, weight=cuda_randn(2, seed + 2), temperature=2.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_labels_and_reductions(case, reduction, seed):
    divergence, options = case
    student, teacher = cuda_logits((4, 8, 32000), torch.bfloat16, seed)
    labels = make_labels((4, 8), seed).to(CUDA)
    _, grad, _ = check_gpu(
        student, teacher, divergence, options, reduction=reduction, labels=labels, temperature=2.5
    )
    assert (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_neg_inf_masks_and_whole_tiles(case, seed):
    """A shared -inf mask (30%), and rows whose first / last tiles / all but a few entries are -inf."""
    divergence, options = case
    student, teacher = cuda_logits((8, 128256), torch.float32, seed, neg_inf_frac=0.3)
    student[0, :8192], teacher[0, :8192] = -INF, -INF  # the first two tiles masked
    student[1, 4096:], teacher[1, 4096:] = -INF, -INF  # all tiles but the first masked
    student[2, :-5], teacher[2, :-5] = -INF, -INF  # five entries left, in the last (partial) tile
    _, grad, _ = check_gpu(student, teacher, divergence, options, weight=cuda_randn(8, seed + 2))
    assert (grad[torch.isneginf(student)] == 0).all()


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_special_rows(case, seed):
    """All -inf (0 / 0); one side all -inf, a NaN, a +inf (NaN loss and NaN gradient row); nothing leaks."""
    divergence, options = case
    student, teacher = cuda_logits((10, 128256), torch.bfloat16, seed, scale=1.0)
    student[0], teacher[0] = -INF, -INF
    student[1] = -INF
    teacher[2] = -INF
    student[3, 100000] = NAN
    teacher[4, 5] = NAN
    student[5, 70000] = INF
    teacher[6, 128255] = INF
    weight = cuda_randn(10, seed).abs() + 0.5
    clean_s, clean_t = student[7:], teacher[7:]
    check_special_rows(
        student, teacher, clean_s, clean_t, divergence, options, weight, backend="triton", oracle=False
    )


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_ties_give_zero(case, seed):
    """Identical student and teacher: loss 0 and gradient 0, up to rounding (relative to q <= 1)."""
    divergence, options = case
    student, _ = cuda_logits((4, 128256), torch.float32, seed)
    weight = cuda_randn(4, seed)
    loss, grad = loss_and_grad(
        student, student.clone(), divergence, options, "none", weight, backend="triton"
    )
    assert_close_verbose(loss, torch.zeros(4), LOSS_TOL, 0, "loss")
    assert_close_verbose(grad, torch.zeros_like(grad), 1e-5 * weight.abs().max().item(), 0, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_grad_in_place(case, dtype, seed):
    """Same gradient as out of place, bit for bit, through an LM head; the logits hold it afterwards."""
    divergence, options = case
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(16, 256, generator=gen).to(CUDA, dtype)
    w = (torch.randn(256, 32000, generator=gen) / 8).to(CUDA, dtype)
    _, teacher = cuda_logits((2, 8, 32000), dtype, seed)
    labels = make_labels((2, 8), seed, device=CUDA)
    args = (h, w, teacher, divergence, options)
    loss, _, grad, grad_w = run_linear_head("triton", False, *args, labels=labels)
    loss_ip, logits_ip, grad_ip, grad_w_ip = run_linear_head("triton", True, *args, labels=labels)
    assert torch.equal(loss_ip, loss) and torch.equal(grad_ip, grad)
    assert torch.equal(logits_ip, grad), "the logits must hold the gradient"
    assert torch.equal(grad_w_ip, grad_w)
    assert (grad_ip[labels == -100] == 0).all()


@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_agrees_with_cpu_kernel(case, seed):
    divergence, options = case
    student, teacher = make_logits((6, 32000), torch.float32, scale=SCALE, seed=seed)
    labels = make_labels((6,), seed)
    weight = randn(6, seed)
    check_triton_agrees_with_cpu(
        student, teacher, divergence, options, weight, tol=1e-4, device=CUDA, labels=labels
    )


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_on_cuda(compile_backend, fresh_dynamo, seed):
    def loss_fn(s, t, labels):
        return fdistill.divergence_loss(s, t, "jsd", beta=0.3, labels=labels, temperature=2.0)

    compiled = torch.compile(loss_fn, backend=compile_backend, fullgraph=True)
    shapes = [(2, 4, 32000)]
    compiled_vs_eager(compiled, loss_fn, shapes, torch.bfloat16, seed, CUDA, scale=SCALE, grad_rtol=1e-2)


@pytest.mark.parametrize("labelled", [False, True], ids=["nolabels", "labels"])
def test_opcheck_on_cuda(labelled, seed):
    fdistill.divergence_loss(*cuda_logits((1, 8), torch.float32, seed), backend="triton")  # registers the ops
    fwd, bwd = torch.ops.fdistill.divergence_fwd_triton, torch.ops.fdistill.divergence_bwd_triton
    opcheck_forward(fwd, "jsd", 0.3, torch.float32, labelled, seed, CUDA)
    opcheck_backward(fwd, bwd, "jsd", 0.3, torch.float32, labelled, seed, CUDA)
