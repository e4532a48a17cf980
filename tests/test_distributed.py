"""The trainer under ``torchrun`` (2 processes, gloo, CPU): the smoke teacher-hacking run and the smoke
RLHF ``rl`` and ``warp`` runs match the 1-process runs with the same global batch, rank 0 alone
writes, a run interrupted on 2 processes finishes on 1, and bad world sizes fail cleanly on every rank.

Tolerance: ``rtol=1e-5`` on float32 values. The 2-process run is not bitwise the 1-process run: each
rank's forward runs on half the batch (other matmul blockings) and gradients and metrics are summed
across ranks in another order; the differences seen are ~1e-7 relative."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fdistill.trainer.distributed as dist_helpers

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["teacher-hacking", "--preset", "smoke", "--no-progress", "--no-plots"]
TIMEOUT = 300  # seconds for a whole smoke run on a busy 2-core machine


def _env():
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, cwd, nproc=None, timeout=TIMEOUT):
    """``python ARGS`` (``nproc`` None) or ``torchrun --nproc_per_node NPROC ARGS``."""
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]  # fmt: skip
    return subprocess.run(
        cmd + list(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _curves(out: Path) -> dict:
    return json.loads((out / "curves.json").read_text())


def _assert_same_curves(got: dict, want: dict) -> None:
    assert got["run"] == want["run"]
    assert got["per_seed"].keys() == want["per_seed"].keys()
    for seed, run in want["per_seed"].items():
        _assert_same_seed(got["per_seed"][seed], run)


def _assert_same_seed(got: dict, want: dict) -> None:
    np.testing.assert_allclose(got["teacher_golden"], want["teacher_golden"], rtol=1e-5)
    for key in ("proxy", "golden"):
        np.testing.assert_allclose(got["student_start"][key], want["student_start"][key], rtol=1e-5)
    assert got["sources"].keys() == want["sources"].keys()
    for name, c in want["sources"].items():
        assert got["sources"][name]["steps"] == c["steps"]
        for key in ("proxy", "golden", "train_loss"):
            assert len(got["sources"][name][key]) == len(c[key])
            np.testing.assert_allclose(got["sources"][name][key], c[key], rtol=1e-5, err_msg=f"{name} {key}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process smoke run (plain ``python -m fdistill``)."""
    out = tmp_path_factory.mktemp("one") / "run"
    done = _run(["-m", "fdistill", *SMOKE, "--out", str(out)], out.parent)
    assert done.returncode == 0, done.stderr
    return _curves(out)


def test_two_processes_match_one_and_rank0_writes(tmp_path, reference):
    out = tmp_path / "run"
    done = _run(["-m", "fdistill", *SMOKE, "--out", str(out)], tmp_path, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_curves(_curves(out), reference)
    # rank 0 alone logs and writes: one copy of each log line, no stray or temporary files
    assert done.stdout.count("stage 1: teacher") == 1 and done.stdout.count("| data source |") == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "curves.json", "run.json", "summary.md"]
    assert not list(out.rglob("*.tmp"))


STOP_SCRIPT = """
import sys
import fdistill.trainer.experiment as experiment
from fdistill.__main__ import main

real, calls = experiment.distillation_loss, [0]

def stopping(*args, **kwargs):  # stage 1 makes 20 calls; call 50 is step 30 of the first stage-3 run
    calls[0] += 1
    if calls[0] == 50:
        raise SystemExit(3)  # on every rank, at the same step: an interruption after the step-20 checkpoint
    return real(*args, **kwargs)

experiment.distillation_loss = stopping
sys.exit(main(sys.argv[1:]))
"""


def test_interrupted_on_two_processes_resumes_on_one(tmp_path, reference):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    out = tmp_path / "run"
    stopped = _run([str(script), *SMOKE, "--out", str(out)], tmp_path, nproc=2)
    assert stopped.returncode != 0 and not (out / "curves.json").exists()
    assert (out / "checkpoints" / "seed0" / "distill_offline_8x1.safetensors").exists()
    resumed = _run(["-m", "fdistill", *SMOKE, "--out", str(out)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming student at step 20" in resumed.stdout
    _assert_same_curves(_curves(out), reference)


BAD_BATCH_SCRIPT = """
import dataclasses, sys
from fdistill.trainer import distributed
from fdistill.trainer.experiment import preset_config, run_teacher_hacking

try:
    run_teacher_hacking(dataclasses.replace(preset_config("smoke"), batch=33), sys.argv[1], progress=False)
except ValueError as exc:
    print(f"rank {distributed.rank()}: {exc}", flush=True)
    sys.exit(2)
"""


def test_batch_not_divisible_by_world_size_fails_on_every_rank(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text(BAD_BATCH_SCRIPT)
    done = _run([str(script), str(tmp_path / "run")], tmp_path, nproc=2, timeout=120)
    assert done.returncode != 0
    for r in (0, 1):
        assert f"rank {r}: the preset's batch (33) must be divisible by the world size (2)" in done.stdout
    assert not (tmp_path / "run").exists()  # refused before anything is written


def _assert_close_tree(got, want, path="") -> None:
    """Same structure, the same non-floats, floats allclose (``atol`` for values that are 0 up to
    rounding, e.g. the SFT policy's KL to itself)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _assert_close_tree(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close_tree(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=path)
    else:
        assert got == want, path


RLHF_LOG_LINES = {  # a stage's log line and the summary table's head
    "rl": ("stage: reward model", "| RL run (optimised reward"),
    "warp": ("stage: WARP it1 policy1", "| run | true final"),
}


@pytest.mark.parametrize("method", sorted(RLHF_LOG_LINES))
def test_rlhf_two_processes_match_one_and_rank0_writes(tmp_path, method):
    args = ["-m", "fdistill", "rlhf", "--method", method, "--preset", "smoke", "--no-progress", "--no-plots"]
    one = _run([*args, "--out", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _run([*args, "--out", str(tmp_path / "two")], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    got, want = _curves(tmp_path / "two"), _curves(tmp_path / "one")
    _assert_close_tree(got, want)  # the steps (and every other non-float) are identical
    # rank 0 alone logs and writes: one copy of each log line, the same files, no temporary ones
    assert all(two.stdout.count(line) == 1 for line in RLHF_LOG_LINES[method])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "checkpoints").iterdir()
    )
    assert not list((tmp_path / "two").rglob("*.tmp"))


RLHF_BAD_BATCH_SCRIPT = """
import dataclasses, sys
from fdistill.trainer import distributed
from fdistill.trainer.rlhf.experiment import PRESETS, run_rlhf

try:
    run_rlhf("rl", dataclasses.replace(PRESETS["smoke"], rl_prompts=3), sys.argv[1], progress=False)
except ValueError as exc:
    print(f"rank {distributed.rank()}: {exc}", flush=True)
    sys.exit(2)
"""


def test_rlhf_batch_not_divisible_by_world_size_fails_on_every_rank(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text(RLHF_BAD_BATCH_SCRIPT)
    done = _run([str(script), str(tmp_path / "run")], tmp_path, nproc=2, timeout=120)
    assert done.returncode != 0
    for r in (0, 1):
        assert f"rank {r}: rl_prompts (3) must be divisible by the world size (2)" in done.stdout
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_helpers_on_one_process():
    import torch

    assert (dist_helpers.rank(), dist_helpers.world(), dist_helpers.is_main()) == (0, 1, True)
    batch = torch.arange(6).reshape(3, 2)
    assert torch.equal(dist_helpers.shard(batch), batch)
    assert torch.equal(dist_helpers.split(batch), batch)
    assert dist_helpers.weighted_mean({"a": 2}, 5) == {"a": 2.0}
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert dist_helpers.average_gradients([p], 1.5) == [1.5] and torch.equal(p.grad, torch.full((2,), 3.0))
    dist_helpers.barrier()
    dist_helpers.check_divisible(7)
