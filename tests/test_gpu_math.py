"""The GPU tests' checks on CPU tensors, under the Triton interpreter with the GPU's approximate
float32 exp / log / divide / sqrt imitated (tests/gpu_math.py): the tolerances of tests/test_gpu.py
must hold with room to spare before a GPU is lent. Each test prints its margins (error / tolerance,
1 = at the limit) with ``-s``.
"""

from __future__ import annotations

import pytest
import torch
from gpu_checks import check_gpu
from gpu_math import gpu_approximate_math
from utils import CASE_IDS, DIVERGENCE_CASES, INF, SCALE, SECTION, SECTION_IDS, make_logits, randn

from fdistill._triton_dispatch import interpreter_enabled, triton_available

pytestmark = pytest.mark.skipif(
    not (triton_available() and interpreter_enabled() and not torch.cuda.is_available()),
    reason="runs the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, no GPU)",
)

# float32: each check within half its GPU tolerance. bfloat16: the rounding of the exact gradient to
# bfloat16 alone takes up to ~0.9 of the entry-wise rule (seen with exact math too), so only the
# tolerance itself is asserted there, the loss and the gradient rows with room.
MARGINS = {
    torch.float32: {"loss": 0.5, "grad": 0.5, "rows": 0.5},
    torch.bfloat16: {"loss": 0.5, "grad": 1.0, "rows": 0.75},
}


def run_checked(student, teacher, divergence, options, seed, **kwargs):
    with gpu_approximate_math(seed):
        _, grad, margins = check_gpu(student, teacher, divergence, options, **kwargs)
    print(f"{divergence} {options} {student.dtype}: " + ", ".join(f"{k} {v:.3f}" for k, v in margins.items()))
    limits = MARGINS[student.dtype]
    assert all(margins[k] <= limits[k] for k in limits), (margins, limits)
    return grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_llama3_vocabulary_with_gpu_math(case, dtype, seed):
    """Two rows of the Llama 3 vocabulary (32 tiles, the last partial), as test_gpu's."""
    divergence, options = case
    student, teacher = make_logits((2, 128256), dtype, scale=SCALE, seed=seed)
    run_checked(student, teacher, divergence, options, seed, weight=randn(2, seed + 2))


@pytest.mark.parametrize("case", SECTION, ids=SECTION_IDS)
def test_masks_and_temperature_with_gpu_math(case, seed):
    """-inf masks over whole tiles and a temperature, with the approximate math."""
    divergence, options = case
    student, teacher = make_logits((3, 20000), torch.float32, scale=SCALE, seed=seed, neg_inf_frac=0.3)
    student[0, :8192], teacher[0, :8192] = -INF, -INF
    student[1, 4096:], teacher[1, 4096:] = -INF, -INF
    grad = run_checked(
        student, teacher, divergence, options, seed, weight=randn(3, seed + 2), temperature=2.0
    )
    assert (grad[torch.isneginf(student)] == 0).all()
