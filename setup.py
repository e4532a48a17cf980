"""Builds fdistill._C against the torch that is already installed.

Environment switches:
  FDISTILL_CUDA=auto|0|1   build the CUDA kernels. auto: when torch has CUDA and the nvcc that
                           BuildExtension runs (CUDA_HOME/bin/nvcc) has torch's CUDA major version,
                           else skipped with a printed message (the Triton kernels still work);
                           1: those cases are errors
  TORCH_CUDA_ARCH_LIST     the CUDA archs; default: those of the visible GPUs plus 9.0, +PTX on the
                           highest ("8.0;9.0+PTX" without a visible GPU)
  FDISTILL_CUDA_ARCHS      the same, when TORCH_CUDA_ARCH_LIST is not set
  FDISTILL_DEBUG=1         -O0 -g
  MAX_JOBS                 parallel compile jobs

Ninja builds the extension when it is found (on PATH, next to the interpreter, or from the ninja
package, whose directory is then put on PATH); otherwise BuildExtension compiles file by file.
The decisions are the pure functions of fdistill_build.py (tested by tests/test_cuda_build.py).
"""

import glob
import os
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # PEP 517 backends do not put the project directory on sys.path
import fdistill_build  # noqa: E402


def _nvcc_version():
    """The release of the nvcc BuildExtension runs (PYTORCH_NVCC, else CUDA_HOME/bin/nvcc), or None."""
    nvcc = os.getenv("PYTORCH_NVCC") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return fdistill_build.parse_nvcc_version(out)


def _visible_caps():
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _use_cuda() -> bool:
    want = os.getenv("FDISTILL_CUDA", "auto")
    nvcc = _nvcc_version() if want != "0" and torch.version.cuda else None
    caps = _visible_caps() if nvcc else []
    build, archs, message = fdistill_build.cuda_build_plan(want, torch.version.cuda, nvcc, caps, os.environ)
    print(message, file=sys.stderr)
    if build:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return build


def _use_ninja() -> bool:
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package ships the binary

        extra.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    found = fdistill_build.ninja_dir(os.environ.get("PATH", ""), extra)
    if found and found not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = found + os.pathsep + os.environ.get("PATH", "")
    return found is not None


def _extension():
    debug = os.getenv("FDISTILL_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # No FMA contraction: the kernels' error analysis assumes each written operation rounds once
    # (q - p of two equal probabilities must be 0, not the rounding error of one product).
    # -fopenmp: at::parallel_for is a header template over torch's OpenMP backend; without the flag
    # its pragma is dropped and every CPU kernel runs on one thread.
    cxx = opt + ["-std=c++17", "-fvisibility=hidden", "-ffp-contract=off", "-fopenmp"]
    link = ["-fopenmp"]
    if _use_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "fdistill._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FDISTILL_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": opt + ["-std=c++17"]},
            extra_link_args=link,
        )
    return CppExtension(
        "fdistill._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=_use_ninja())})
