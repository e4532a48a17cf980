"""Build decisions of setup.py as pure functions (tests/test_cuda_build.py covers every branch without
building). Not installed: setup.py imports it from the source tree."""

from __future__ import annotations

import os
import re

DEFAULT_ARCHS = "8.0;9.0+PTX"  # no visible GPU: A100 and H100 (PTX for newer cards)


def cuda_major(version: str | None) -> int | None:
    """'12.8' -> 12."""
    return int(version.split(".")[0]) if version else None


def parse_nvcc_version(text: str) -> str | None:
    """'13.0' from `nvcc --version` ('Cuda compilation tools, release 13.0, V13.0.88')."""
    m = re.search(r"release (\d+\.\d+)", text)
    return m.group(1) if m else None


def arch_list_for(caps) -> str:
    """TORCH_CUDA_ARCH_LIST for the visible cards' (major, minor) capabilities, with 9.0 always in and
    +PTX on the highest; DEFAULT_ARCHS when there is none."""
    if not caps:
        return DEFAULT_ARCHS
    archs = sorted({tuple(c) for c in caps} | {(9, 0)})
    return ";".join(f"{major}.{minor}" for major, minor in archs) + "+PTX"


def cuda_build_plan(want: str, torch_cuda: str | None, nvcc_version: str | None, visible_caps, env):
    """(build, arch_list, message) for FDISTILL_CUDA=`want` (auto, 0 or 1), torch.version.cuda, the
    release of the nvcc BuildExtension would run (None: not found), the visible cards' capabilities
    and the environment (TORCH_CUDA_ARCH_LIST, then FDISTILL_CUDA_ARCHS, override the cards).

    auto skips the CUDA kernels with a message when torch has no CUDA, nvcc is missing or its CUDA
    major differs from torch's; FDISTILL_CUDA=1 raises RuntimeError in those cases instead.
    """
    if want not in ("auto", "0", "1"):
        raise ValueError(f"FDISTILL_CUDA must be auto, 0 or 1, got {want!r}")
    if want == "0":
        return False, None, "fdistill: FDISTILL_CUDA=0: building the CPU kernels only"
    problem = None
    if torch_cuda is None:
        problem = "torch has no CUDA (torch.version.cuda is None)"
    elif nvcc_version is None:
        problem = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    elif cuda_major(nvcc_version) != cuda_major(torch_cuda):
        problem = (f"nvcc is CUDA {nvcc_version} and torch was built with CUDA {torch_cuda}: "
                   "their major versions must match (set CUDA_HOME to a matching toolkit)")  # fmt: skip
    if problem:
        if want == "1":
            raise RuntimeError(f"fdistill: FDISTILL_CUDA=1 cannot build the CUDA kernels: {problem}")
        return False, None, f"fdistill: skipping the CUDA kernels: {problem}; the Triton kernels still work"
    if env.get("TORCH_CUDA_ARCH_LIST"):
        archs, source = env["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    elif env.get("FDISTILL_CUDA_ARCHS"):
        archs, source = env["FDISTILL_CUDA_ARCHS"], "FDISTILL_CUDA_ARCHS"
    else:
        archs = arch_list_for(visible_caps)
        source = "the visible GPUs and 9.0" if visible_caps else "no visible GPU: the default"
    return True, archs, f"fdistill: building the CUDA kernels (nvcc {nvcc_version}) for {archs} ({source})"


def ninja_dir(path: str, extra_dirs) -> str | None:
    """The first directory of PATH, then of extra_dirs (the interpreter's, the ninja package's), that
    holds an executable ninja; None when there is none."""
    for d in [*path.split(os.pathsep), *extra_dirs]:
        exe = os.path.join(d, "ninja") if d else ""
        if exe and os.path.isfile(exe) and os.access(exe, os.X_OK):
            return d
    return None
