"""Fixtures of the fdistill test suite: per-test reproducible seeds."""

from __future__ import annotations

import pytest
import torch  # before fdistill: the extension links against torch's shared libraries
from utils import seed_from

import fdistill


def pytest_report_header(config):
    if not fdistill.has_cpu_kernels():
        return "fdistill: C++ extension NOT built; kernel tests will fail"
    return f"fdistill: CPU kernels use {fdistill.cpu_capability()}; torch {torch.__version__}"


@pytest.fixture
def seed(request) -> int:
    """A seed that differs between tests (and parametrisations) but is the same on every run."""
    return seed_from(request.node.nodeid)


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Code that draws from torch's global generator is reproducible too."""
    torch.manual_seed(seed_from("global:" + request.node.nodeid))
