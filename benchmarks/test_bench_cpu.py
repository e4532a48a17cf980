"""pytest-benchmark version of bench_cpu.py (not part of the test suite):

    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:divergence,param:dtype

Shape from FDISTILL_BENCH_TOKENS / FDISTILL_BENCH_VOCAB (default 512 x 32000).
"""

import os

import pytest
import torch

import fdistill

TOKENS = int(os.getenv("FDISTILL_BENCH_TOKENS", "512"))
VOCAB = int(os.getenv("FDISTILL_BENCH_VOCAB", "32000"))


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def logits(request):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[request.param]
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(TOKENS, VOCAB, generator=gen) * 2).to(dtype)
    teacher = (torch.randn(TOKENS, VOCAB, generator=gen) * 2).to(dtype)
    return student, teacher


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("divergence", fdistill.DIVERGENCES)
def test_forward_backward(benchmark, logits, divergence, backend):
    student, teacher = logits
    x = student.clone().requires_grad_()

    def step():
        fdistill.divergence_loss(x, teacher, divergence, backend=backend).backward()
        x.grad = None

    benchmark(step)
