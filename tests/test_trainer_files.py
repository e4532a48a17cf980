"""The files a trainer run writes and reads, and what happens when they are damaged: checkpoints that
verify their sha256 (flipped bytes, an edited metadata digit), atomic writes, an unusable ``--out``, a
damaged ``run.json``, and a missing trainer extra — each one clear line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fdistill.__main__ import main as cli
from fdistill.trainer import CheckpointError, LMConfig, TinyLM, load_checkpoint, save_checkpoint
from fdistill.trainer.extras import EXTRA, MissingExtraError, require_for_run
from fdistill.trainer.files import write_atomic
from fdistill.trainer.rlhf.experiment import run_rlhf
from fdistill.trainer.rundir import CHECKPOINTS, RUN_JSON, checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
CFG = LMConfig(vocab=17, width=32, depth=1, heads=4, context=20)
IRL = ["rlhf", "--method", "irl", "--preset", "smoke", "--no-progress", "--no-plots"]


def _model(seed):
    torch.manual_seed(seed)
    return TinyLM(CFG)


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def saved(tmp_path, seed):
    """A checkpoint with a model, an optimizer state, a generator and metadata."""
    m = _model(seed)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.zeros(2, 5, dtype=torch.long)).sum().backward()
    opt.step()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, models={"m": m}, optimizers={"m": opt}, generators={"g": torch.Generator()},
                    meta={"step": 37, "loss": [0.5, 0.25]})  # fmt: skip
    return path, m


def test_checkpoint_round_trip_is_exact(saved, seed):
    path, m = saved
    other = _model(seed + 1)
    assert load_checkpoint(path, models={"m": other}) == {"step": 37, "loss": [0.5, 0.25]}
    for a, b in zip(m.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flipped", [1, 16])
def test_flipped_tensor_bytes_fail_the_checksum(saved, flipped):
    path, m = saved
    data = bytearray(path.read_bytes())
    middle = (_header_end(data) + len(data)) // 2  # inside the tensors' bytes
    for i in range(middle, middle + flipped):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 checksum") as info:
        load_checkpoint(path, models={"m": m})
    assert str(path) in str(info.value) and "delete the file" in str(info.value)


def test_edited_metadata_digit_fails_the_checksum(saved):
    path, m = saved
    data = path.read_bytes()
    assert data.count(b'\\"step\\": 37') == 1  # the metadata is JSON inside the JSON header
    path.write_bytes(data.replace(b'\\"step\\": 37', b'\\"step\\": 38'))
    with pytest.raises(CheckpointError, match="sha256 checksum") as info:
        load_checkpoint(path, models={"m": m})
    assert str(path) in str(info.value)


@pytest.mark.parametrize("where", ["header size", "checksum field", "truncated"])
def test_damaged_header_is_reported_as_corrupt(saved, where):
    path, m = saved
    data = bytearray(path.read_bytes())
    if where == "header size":
        data[0] ^= 0x10
    elif where == "checksum field":
        i = data.index(b'"fdistill_sha256":"') + len(b'"fdistill_sha256":"')
        data[i] = ord("g")  # no longer a hex digit
    else:
        data = data[: _header_end(data) + 10]
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(path, models={"m": m})
    assert str(path) in str(info.value)


def test_checkpoint_without_checksum_is_refused(tmp_path, seed):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"model/m/x": torch.zeros(2)}, str(path), metadata={"fdistill": json.dumps({"meta": {}})})
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(path, models={"m": _model(seed)})


def test_atomic_write_ignores_a_stale_temporary_file(tmp_path):
    path = tmp_path / "curves.json"
    (tmp_path / "curves.json.tmp").write_text("half a file left by kill -9")
    write_atomic(path, "{}")
    assert path.read_text() == "{}" and not (tmp_path / "curves.json.tmp").exists()
    write_atomic(path, b"[1]")
    assert path.read_text() == "[1]"


@pytest.fixture(scope="module")
def irl_run(tmp_path_factory):
    """A finished IRL smoke run (a few seconds), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("irl") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curves = run_rlhf("irl", "smoke", out, plots=False, progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out, curves


def test_flipped_byte_in_a_run_checkpoint_stops_the_rerun(irl_run, tmp_path, capsys):
    """Before checksums, one flipped byte here reran to different curves with exit code 0."""
    out = tmp_path / "run"
    shutil.copytree(irl_run[0], out)
    before = (out / "curves.json").read_bytes()
    path = checkpoint_path(out, "seed0/irl_0")
    data = bytearray(path.read_bytes())
    data[(_header_end(data) + len(data)) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert cli([*IRL, "--out", str(out), "--threads", "1"]) == 2
    _one_line_error(capsys, path, "checksum", "delete the file")
    assert (out / "curves.json").read_bytes() == before
    # the recovery the message names: delete the file; the stage is recomputed to the same curves
    path.unlink()
    assert cli([*IRL, "--out", str(out), "--threads", "1"]) == 0
    assert (out / "curves.json").read_bytes() == before


def test_kill_9_mid_run_then_resume_gives_byte_identical_curves(tmp_path, capsys):
    """A real SIGKILL (no cleanup, no exception handler) in the middle of an RL stage, right after its
    first periodic checkpoint, and a rerun: the same curves.json, byte for byte."""
    rl = ["rlhf", "--method", "rl", "--preset", "smoke", "--no-progress", "--no-plots", "--threads", "1"]
    assert cli([*rl, "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "fdistill", *rl, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first_rl = checkpoint_path(out, "seed0/true_reward_beta_0_01")
    deadline = time.monotonic() + 60
    while not first_rl.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "curves.json").exists(), "the run finished before it was killed"
    capsys.readouterr()
    assert cli([*rl, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert (out / "curves.json").read_bytes() == (tmp_path / "full" / "curves.json").read_bytes()


# ----------------------------------------------------------------------------- --out and run.json


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("not a directory")
    assert cli([*IRL, "--out", str(out)]) == 2
    _one_line_error(capsys, out, "is a file")
    assert out.read_text() == "not a directory"
    assert cli([*IRL, "--out", str(out), "--fresh"]) == 2  # --fresh deletes no file either
    _one_line_error(capsys, out)
    assert out.read_text() == "not a directory"


def test_out_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "deeper" / "run"
    assert cli([*IRL, "--out", str(out)]) == 2
    _one_line_error(capsys, out, tmp_path / "file", "which is a file")
    with pytest.raises(ValueError, match="which is a file"):  # the Python API says the same
        run_rlhf("irl", "smoke", out, plots=False, progress=False, log=lambda *_: None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_refused(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert cli([*IRL, "--out", str(parent / "run")]) == 2
        _one_line_error(capsys, parent, "not writable")
    finally:
        parent.chmod(0o700)
    assert not (parent / "run").exists()


def test_unwritable_checkpoint_directory_mid_run_is_one_line(tmp_path, capsys):
    """A write that fails after the checks (here: ``checkpoints`` is a file, as root's chmod would not
    stop a write) names the path too."""
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINTS).write_text("")
    assert cli([*IRL, "--out", str(out)]) == 2
    _one_line_error(capsys, "cannot write", out / CHECKPOINTS)


@pytest.mark.parametrize("content", [b'{"method": "irl", "pre', b"", b"\xff\xfe\x00binary"])
def test_damaged_run_json_is_one_clear_line(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_JSON).write_bytes(content)
    assert cli([*IRL, "--out", str(out)]) == 2
    _one_line_error(capsys, out / RUN_JSON, "not valid JSON", "--fresh")
    assert sorted(p.name for p in out.iterdir()) == [RUN_JSON]  # nothing else was written


# ----------------------------------------------------------------------------- the trainer extra


def test_the_extra_named_is_the_one_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0].strip() for req in extras[EXTRA]}
    assert {"safetensors", "tqdm", "matplotlib"} <= names


@pytest.mark.parametrize(
    "module, flags",
    [("safetensors", ["--no-progress", "--no-plots"]), ("matplotlib", ["--no-progress"]), ("tqdm", [])],
)
def test_missing_extra_is_named_before_anything_is_written(tmp_path, monkeypatch, capsys, module, flags):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    out = tmp_path / "run"
    args = ["rlhf", "--method", "irl", "--preset", "smoke", "--out", str(out), *flags]
    assert cli(args) == 2
    _one_line_error(capsys, module, f"pip install 'fdistill[{EXTRA}]'")
    assert not out.exists()
    assert cli(["teacher-hacking", "--preset", "smoke", "--out", str(out), *flags]) == 2
    _one_line_error(capsys, module)
    assert not out.exists()


def test_runs_without_plots_or_progress_need_neither(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    require_for_run(progress=False, plots=False)
    with pytest.raises(MissingExtraError, match="--no-plots"):
        require_for_run(progress=False, plots=True)
    with pytest.raises(MissingExtraError, match="tqdm .*matplotlib"):
        require_for_run(progress=True, plots=True)
