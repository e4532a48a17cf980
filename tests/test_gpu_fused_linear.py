"""Fused-linear losses on a CUDA GPU (cuBLAS matmuls + Triton row kernels) against the float64
materialised computation on the CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from test_fused_linear import (
    CHUNK,
    assert_matches,
    assert_no_worse_than_eager,
    eager_result,
    fused,
    make_head,
    make_labels,
    oracle,
    teacher_head_logits,
    topk_of,
)
from utils import randn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("skew_kl", {"skew": 0.1}),
    ("tv", {}),
    ("alpha", {"alpha": 1.5}),
]


def on_gpu(tensors):
    return [None if t is None else t.cuda() for t in tensors]


def to_cpu(result):
    loss, grads = result
    return loss.cpu(), [g.cpu() for g in grads]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_gpu_matches_oracle(case, reduction, seed):
    divergence, options = case
    student = make_head(seed, tokens=301, vocab=32011)
    (th, tw, tb), teacher = teacher_head_logits(seed, torch.float32, vocab=32011)
    labels = make_labels(seed, tokens=301, vocab=32011)
    grad_out = randn((301,), seed + 9, torch.float64) if reduction == "none" else None
    want = oracle(
        student,
        teacher,
        divergence,
        options,
        labels=labels,
        hard=0.3,
        temperature=1.5,
        softcap=20.0,
        reduction=reduction,
        grad_out=grad_out,
    )
    got = fused(
        on_gpu(student),
        teacher_hidden=th.cuda(),
        teacher_weight=tw.cuda(),
        teacher_bias=tb.cuda(),
        divergence=divergence,
        labels=labels.cuda(),
        hard_loss_weight=0.3,
        temperature=1.5,
        softcap=20.0,
        reduction=reduction,
        chunk_size=64,
        grad_out=None if grad_out is None else grad_out.float().cuda(),
        **options,
    )
    assert_matches(to_cpu(got), want, 1e-4, 1e-4)  # TF32 may be on for cuBLAS: matmul rounding


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_gpu_topk(tail, seed):
    student = make_head(seed, tokens=301, vocab=32011)
    teacher = randn((301, 32011), seed + 5, torch.float64) * 3
    indices, logprobs = topk_of(teacher, 64)
    cpu = fused(student, teacher_topk=(indices, logprobs.float()), topk_tail=tail, chunk_size=CHUNK)
    gpu = fused(on_gpu(student), teacher_topk=(indices.cuda(), logprobs.float().cuda()), topk_tail=tail)
    assert_matches(to_cpu(gpu), [cpu[0].double(), [g.double() for g in cpu[1]]], 1e-4, 1e-4)


def test_gpu_autocast_bfloat16(seed):
    student = make_head(seed, tokens=301, vocab=32011)
    (th, tw, tb), teacher = teacher_head_logits(seed, torch.float32, vocab=32011)
    want = oracle(student, teacher, "jsd", {"beta": 0.5})
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fused(
            on_gpu(student),
            teacher_hidden=th.cuda(),
            teacher_weight=tw.cuda(),
            teacher_bias=tb.cuda(),
            divergence="jsd",
        )
        eager = eager_result(
            on_gpu(student),
            torch.nn.functional.linear(th.cuda(), tw.cuda(), tb.cuda()),
            "jsd",
            backend="triton",
        )
    assert all(g.dtype == torch.float32 for g in got[1])
    assert_no_worse_than_eager(to_cpu(got), to_cpu(eager), want, 1.5, torch.finfo(torch.bfloat16).eps)
