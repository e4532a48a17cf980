"""Fixtures of the fdistill test suite: per-test reproducible seeds.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter, which triton
enables only when ``TRITON_INTERPRET=1`` is set before its kernels are defined (``torch._dynamo``
imports triton too): so it is set here, before anything else is imported.
"""

from __future__ import annotations

import os

import torch  # before fdistill: the extension links against torch's shared libraries

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from utils import seed_from  # noqa: E402

import fdistill  # noqa: E402
from fdistill._triton_dispatch import interpreter_enabled, triton_available  # noqa: E402


def pytest_report_header(config):
    lines = []
    if not fdistill.has_cpu_kernels():
        lines.append("fdistill: C++ extension NOT built; kernel tests will fail")
    else:
        lines.append(f"fdistill: CPU kernels use {fdistill.cpu_capability()}; torch {torch.__version__}")
    if not triton_available():
        lines.append("fdistill: triton is not installed; Triton tests are skipped")
    elif torch.cuda.is_available():
        lines.append(f"fdistill: Triton kernels run on {torch.cuda.get_device_name()}")
    elif interpreter_enabled():
        lines.append("fdistill: Triton kernels run on CPU under the Triton interpreter (TRITON_INTERPRET=1)")
    else:
        lines.append("fdistill: no GPU and TRITON_INTERPRET != 1: Triton tests are skipped")
    return lines


@pytest.fixture
def seed(request) -> int:
    """A seed that differs between tests (and parametrisations) but is the same on every run."""
    return seed_from(request.node.nodeid)


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Code that draws from torch's global generator is reproducible too."""
    torch.manual_seed(seed_from("global:" + request.node.nodeid))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tensors: one torch thread is many times faster than two OpenMP threads that
    contend for a shared 2-core machine (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests start and end with a reset torch._dynamo."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
