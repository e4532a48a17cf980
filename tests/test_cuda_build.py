"""setup.py's build decisions (fdistill_build) in every branch, and the ptxas report parser of
benchmarks/cuda_sm90.py, on any machine: nothing is compiled."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fdistill_build sits next to setup.py and is not installed

import fdistill_build as fb  # noqa: E402
from benchmarks.cuda_sm90 import parse_ptxas, short_names  # noqa: E402

H100, A100, B200 = (9, 0), (8, 0), (10, 0)


def test_versions():
    assert fb.cuda_major("12.8") == 12 and fb.cuda_major("13.0") == 13 and fb.cuda_major(None) is None
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
    assert fb.parse_nvcc_version(text) == "13.0"
    assert fb.parse_nvcc_version("command not found") is None


def test_arch_list_from_the_visible_cards():
    assert fb.arch_list_for([]) == fb.DEFAULT_ARCHS == "8.0;9.0+PTX"
    assert fb.arch_list_for([H100]) == "9.0+PTX"
    assert fb.arch_list_for([A100, A100]) == "8.0;9.0+PTX"  # 9.0 always in, duplicates once
    assert fb.arch_list_for([B200, A100]) == "8.0;9.0;10.0+PTX"  # sorted numerically, PTX on the highest
    assert fb.arch_list_for([(12, 0), (8, 6)]) == "8.6;9.0;12.0+PTX"


def test_plan_builds_with_matching_majors():
    build, archs, message = fb.cuda_build_plan("auto", "12.8", "12.4", [A100], {})
    assert build and archs == "8.0;9.0+PTX" and "8.0;9.0+PTX" in message
    assert fb.cuda_build_plan("1", "13.0", "13.0", [H100], {})[:2] == (True, "9.0+PTX")
    assert fb.cuda_build_plan("auto", "12.8", "12.8", [], {})[1] == fb.DEFAULT_ARCHS  # no visible GPU


def test_plan_respects_the_arch_variables():
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a", "FDISTILL_CUDA_ARCHS": "8.0"}
    build, archs, message = fb.cuda_build_plan("auto", "12.8", "12.8", [A100], env)
    assert build and archs == "9.0a" and "TORCH_CUDA_ARCH_LIST" in message
    build, archs, message = fb.cuda_build_plan("auto", "12.8", "12.8", [A100], {"FDISTILL_CUDA_ARCHS": "8.0"})
    assert archs == "8.0" and "FDISTILL_CUDA_ARCHS" in message
    assert fb.cuda_build_plan("auto", "12.8", "12.8", [H100], {"TORCH_CUDA_ARCH_LIST": ""})[1] == "9.0+PTX"


@pytest.mark.parametrize(
    "torch_cuda, nvcc, reason",
    [
        ("12.8", "13.0", "major versions must match"),
        ("13.0", "12.9", "major versions must match"),
        (None, "13.0", "torch has no CUDA"),
        ("12.8", None, "nvcc was not found"),
    ],
)
def test_plan_skips_on_auto_and_raises_on_1(torch_cuda, nvcc, reason):
    build, archs, message = fb.cuda_build_plan("auto", torch_cuda, nvcc, [H100], {})
    assert not build and archs is None
    assert reason in message and "Triton kernels still work" in message
    with pytest.raises(RuntimeError, match=reason):
        fb.cuda_build_plan("1", torch_cuda, nvcc, [H100], {})


def test_plan_off_and_bad_values():
    assert fb.cuda_build_plan("0", "12.8", "12.8", [H100], {})[:2] == (False, None)
    assert fb.cuda_build_plan("0", None, None, [], {})[:2] == (False, None)  # never an error
    with pytest.raises(ValueError, match="auto, 0 or 1"):
        fb.cuda_build_plan("yes", "12.8", "12.8", [], {})


def _executable(path: Path):
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_ninja_dir(tmp_path):
    on_path, extra, empty = tmp_path / "bin", tmp_path / "pkg", tmp_path / "empty"
    for d in (on_path, extra, empty):
        d.mkdir()
    _executable(extra / "ninja")
    assert fb.ninja_dir(str(empty), [str(extra)]) == str(extra)  # from the package when not on PATH
    _executable(on_path / "ninja")
    assert fb.ninja_dir(os.pathsep.join([str(empty), str(on_path)]), [str(extra)]) == str(on_path)
    (empty / "ninja").write_text("")  # not executable
    assert fb.ninja_dir(str(empty), []) is None
    assert fb.ninja_dir("", []) is None


def test_setup_uses_the_plan():
    """setup.py routes its choices through fdistill_build (the functions tested here) and ninja."""
    text = (ROOT / "setup.py").read_text()
    assert "fdistill_build.cuda_build_plan(" in text and "with_options(use_ninja=" in text


PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8fdistill4cuda45_GLOBAL__N__c4d6d5b1_12_fdiv_cuda_cu_fec0393719fdiv_forward_kernelILNS_5FKindE4EffEEvNS_8FDivArgsEb' for 'sm_90'
ptxas info    : Function properties for _ZN8fdistill4cuda45_GLOBAL__N__c4d6d5b1_12_fdiv_cuda_cu_fec0393719fdiv_forward_kernelILNS_5FKindE4EffEEvNS_8FDivArgsEb
    24 bytes stack frame, 32 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 24 bytes cumulative stack size, 1072 bytes smem
ptxas info    : Function properties for __internal_accurate_pow
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compile time = 150.024 ms
ptxas info    : Compiling entry function '_ZN8fdistill4cuda45_GLOBAL__N__c4d6d5b1_12_fdiv_cuda_cu_fec0393720fdiv_backward_kernelILNS_5FKindE0EddEEvNS_8FDivArgsE' for 'sm_90'
ptxas info    : Function properties for _ZN8fdistill4cuda45_GLOBAL__N__c4d6d5b1_12_fdiv_cuda_cu_fec0393720fdiv_backward_kernelILNS_5FKindE0EddEEvNS_8FDivArgsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 34 registers, used 0 barriers
"""  # noqa: E501


def test_parse_ptxas():
    fwd, bwd = parse_ptxas(PTXAS)
    assert (fwd["registers"], fwd["smem"], fwd["spill_stores"], fwd["spill_loads"]) == (64, 1072, 32, 36)
    assert (bwd["registers"], bwd["smem"], bwd["spill_stores"], bwd["spill_loads"]) == (34, 0, 0, 0)
    names = short_names([fwd["name"], bwd["name"]])
    if names[0] != fwd["name"]:  # c++filt found
        assert names == ["fdiv_forward_kernel<FKind::Alpha2, float, float>",
                         "fdiv_backward_kernel<FKind::KL, double, double>"]  # fmt: skip
