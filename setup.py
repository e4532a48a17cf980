"""Builds fdistill._C against the torch that is already installed.

Environment switches:
  FDISTILL_CUDA=auto|0|1   build the CUDA kernels (auto: when torch has CUDA and nvcc is found)
  FDISTILL_CUDA_ARCHS      TORCH_CUDA_ARCH_LIST for the CUDA build (default "8.0;9.0+PTX")
  FDISTILL_DEBUG=1         -O0 -g
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _use_cuda() -> bool:
    want = os.getenv("FDISTILL_CUDA", "auto")
    if want not in ("auto", "0", "1"):
        raise ValueError(f"FDISTILL_CUDA must be auto, 0 or 1, got {want!r}")
    has_toolkit = CUDA_HOME is not None and torch.version.cuda is not None
    if want == "1" and not has_toolkit:
        raise RuntimeError("FDISTILL_CUDA=1 but torch has no CUDA or nvcc was not found (CUDA_HOME)")
    return want == "1" or (want == "auto" and has_toolkit)


def _extension():
    debug = os.getenv("FDISTILL_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    cxx = opt + ["-std=c++17", "-fvisibility=hidden"]
    if _use_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.getenv("FDISTILL_CUDA_ARCHS", "8.0;9.0+PTX"))
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "fdistill._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FDISTILL_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": opt + ["-std=c++17"]},
        )
    return CppExtension("fdistill._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
