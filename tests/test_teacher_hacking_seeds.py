"""The teacher-hacking experiment's options: the position-keyed tilt, several seeds in one run (the
band math, the aggregate, resume after an interruption) and the monitor on a U-shaped curve."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fdistill.trainer.experiment as experiment
from fdistill.__main__ import main as cli
from fdistill.trainer import LMConfig, TeacherHackingMonitor, TiltedLM, TinyLM
from fdistill.trainer.experiment import (
    Source,
    aggregate_seeds,
    check_seeds,
    preset_config,
    run_teacher_hacking,
)
from fdistill.trainer.report import band_cell, seed_band

CFG = LMConfig(vocab=17, width=32, depth=2, heads=4, context=20, head_scale=3.0)
ROOT = Path(__file__).resolve().parents[1]


def _base(seed):
    torch.manual_seed(seed)
    return TinyLM(CFG).double()


def test_position_keyed_tilt_is_deterministic_and_depends_on_the_position(seed):
    base = _base(seed)
    seqs = torch.randint(0, 17, (4, 12), generator=torch.Generator().manual_seed(seed))
    tilted = TiltedLM(base, 0.5, torch.Generator().manual_seed(seed), key="token_position").double()
    again = TiltedLM(base, 0.5, torch.Generator().manual_seed(seed), key="token_position").double()
    assert tilted.table.shape == (20, 17, 17) and torch.equal(tilted.table, again.table)
    positions = torch.arange(12)
    torch.testing.assert_close(tilted(seqs), base(seqs) + tilted.table[positions, seqs])
    # the same token at two positions gets two different tilts (the bigram tilt gives one)
    same = torch.full((1, 12), 3)
    shift = tilted(same) - base(same)
    assert not torch.allclose(shift[0, 2], shift[0, 7])
    bigram = TiltedLM(base, 0.5, torch.Generator().manual_seed(seed)).double()
    torch.testing.assert_close((bigram(same) - base(same))[0, 2], (bigram(same) - base(same))[0, 7])
    with pytest.raises(ValueError, match="key must be one of"):
        TiltedLM(base, 0.5, torch.Generator(), key="bogus")


def test_position_and_prompt_keyed_tilts(seed):
    base = _base(seed)
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, 17, (6, 12), generator=g)
    seqs[1, :5] = seqs[0, :5]  # rows 0 and 1 share their prompt (5 tokens), not their completion
    pos = TiltedLM(base, 0.5, torch.Generator().manual_seed(seed), key="position").double()
    assert pos.table.shape == (20, 17)
    torch.testing.assert_close(pos(seqs), base(seqs) + pos.table[:12])  # every sequence: the same rows
    prompt = TiltedLM(base, 0.5, torch.Generator().manual_seed(seed), key="prompt", prompt_len=5).double()
    shift = prompt(seqs) - base(seqs)
    assert prompt.table.shape[1] == 17
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))  # one row at every position
    torch.testing.assert_close(shift[0], shift[1])  # keyed on the prompt alone
    assert not torch.allclose(shift[0], shift[2])  # another prompt, another row
    again = TiltedLM(base, 0.5, torch.Generator().manual_seed(seed), key="prompt", prompt_len=5).double()
    torch.testing.assert_close(again(seqs), prompt(seqs))
    with pytest.raises(ValueError, match="prompt_len >= 1"):
        TiltedLM(base, 0.5, torch.Generator(), key="prompt")


def test_seed_band_math_and_cells():
    band = seed_band([[1.0, 2.0, 5.0], [3.0, 6.0, 5.0]])
    assert band == {"mean": [2.0, 4.0, 5.0], "std": [1.0, 2.0, 0.0], "min": [1.0, 2.0, 5.0],
                    "max": [3.0, 6.0, 5.0]}  # fmt: skip
    assert band_cell(band, 1) == "4.000 (2.000–6.000)" and band_cell(band, 2, digits=1) == "5.0"
    assert seed_band([[0.5, 0.25]]) == {"mean": [0.5, 0.25], "std": [0.0, 0.0], "min": [0.5, 0.25],
                                        "max": [0.5, 0.25]}  # fmt: skip
    for bad in ([], [[1.0], [1.0, 2.0]]):
        with pytest.raises(ValueError, match="equally long"):
            seed_band(bad)


def _seed_curves(golden, proxy, steps=(0, 10, 20, 30)):
    curve = {"source": {"name": "s"}, "steps": list(steps), "proxy": proxy, "golden": golden,
             "monitor": {"departure_step": None, "hacking_step": None}}  # fmt: skip
    return {"teacher_golden": 0.1, "student_start": {"proxy": proxy[0], "golden": golden[0]},
            "sources": {"s": curve}}  # fmt: skip


def test_aggregate_over_seeds():
    per_seed = {
        "0": _seed_curves([1.0, 0.5, 0.6, 0.7], [2.0, 1.0, 0.5, 0.25]),
        "3": _seed_curves([1.0, 0.7, 0.4, 0.5], [2.0, 1.0, 0.5, 0.25]),
    }
    monitor = {"fit_points": 2, "tolerance": 0.1, "patience": 1}
    agg = aggregate_seeds(per_seed, monitor)
    assert agg["seeds"] == [0, 3] and agg["teacher_golden"]["mean"] == [0.1]
    s = agg["sources"]["s"]
    assert s["golden"]["mean"] == pytest.approx([1.0, 0.6, 0.5, 0.6]) and s["golden_min_step"] == [10, 20]
    assert s["golden"]["min"] == [1.0, 0.5, 0.4, 0.5] and s["proxy"]["std"] == [0.0] * 4
    # the monitor runs on the mean curve: law fitted on steps 0 and 10, golden then above it
    assert s["monitor"]["departure_step"] == 20 and s["monitor"]["fit"] is not None
    per_seed["3"]["sources"]["s"]["steps"] = [0, 10, 20, 40]
    with pytest.raises(ValueError, match="different steps"):
        aggregate_seeds(per_seed, monitor)


def test_check_seeds_and_the_cli_flag(tmp_path, capsys):
    assert check_seeds([2, 0]) == (2, 0)
    for bad in ((), (1, 1), (0.5,), (True,)):
        with pytest.raises(ValueError, match="seeds must be"):
            check_seeds(bad)
    for text in ("0,x", "1,1"):
        assert (
            cli(["teacher-hacking", "--preset", "smoke", "--seeds", text, "--out", str(tmp_path / "x")]) == 2
        )
        assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_monitor_flags_a_u_at_or_before_its_minimum_and_not_a_power_law():
    u, law = TeacherHackingMonitor(), TeacherHackingMonitor()
    steps = list(range(0, 601, 30))
    proxy = [2.0 * (1 + s) ** -0.5 for s in steps]
    golden = [1.5 * p**0.7 + 0.02 * s / 30 for p, s in zip(proxy, steps, strict=True)]  # falls, then rises
    for s, p, g in zip(steps, proxy, golden, strict=True):
        u.update(s, proxy=p, golden=g)
        law.update(s, proxy=p, golden=1.5 * p**0.7)
    minimum = steps[min(range(len(steps)), key=golden.__getitem__)]
    assert u.departure_step is not None and u.departure_step <= minimum < u.hacking_step
    assert law.departure_step is None and law.hacking_step is None


def _fast_preset():
    """Seconds per seed: a smoke preset cut down further (short sequences), one offline source."""
    smoke = preset_config("smoke")
    source = Source("offline 4x2", "offline", prompts=4, generations=2)
    steps = {"teacher_steps": 4, "sft_steps": 4, "distill_steps": 12, "eval_every": 4, "ckpt_every": 4}
    return dataclasses.replace(smoke, **steps, prompt_len=4, length=8, eval_prompts=8, sources=(source,))


def _run(out, seeds, jobs=1, log=lambda *_: None):
    return run_teacher_hacking(
        _fast_preset(), out, seeds=seeds, jobs=jobs, progress=False, plots=False, log=log
    )


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """(curves, out) of an uninterrupted run of seeds 0 and 1."""
    out = tmp_path_factory.mktemp("two") / "run"
    return _run(out, (0, 1)), out


def test_seeds_in_one_run_match_separate_runs(two_seeds, tmp_path):
    both, out = two_seeds
    alone = _run(tmp_path / "one", (1,))
    assert both["per_seed"]["1"] == alone["per_seed"]["1"] and both["seeds"] == [0, 1]
    g = both["sources"]["offline 4x2"]["golden"]
    assert all(lo <= m <= hi for lo, m, hi in zip(g["min"], g["mean"], g["max"], strict=True))
    assert (out / "checkpoints" / "seed1" / "distill_offline_4x2.safetensors").exists()


def test_interrupted_in_the_second_seed_resumes_to_the_same_bytes(two_seeds, tmp_path, monkeypatch):
    _, reference = two_seeds
    real, calls = experiment.distillation_loss, [0]

    def stopping(*args, **kwargs):  # interrupted in seed 1's distillation, after its step-8 checkpoint
        calls[0] += 1
        if calls[0] == (4 + 12) + 4 + 10:  # seed 0: 4 teacher + 12 distill calls; seed 1: 4, then step 10
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "distillation_loss", stopping)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _run(out, (0, 1))
    assert not (out / "curves.json").exists()
    monkeypatch.setattr(experiment, "distillation_loss", real)
    _run(out, (0, 1))
    assert (out / "curves.json").read_bytes() == (reference / "curves.json").read_bytes()
    assert (out / "summary.md").read_text() == (reference / "summary.md").read_text()


def _start_run(out, *, jobs, until, timeout=120):
    """``_run(out, (0, 1), jobs=jobs)`` in a subprocess on this process's thread count (reductions split
    by it), returned once the file ``until`` exists (or the run ended, or ``timeout`` seconds passed)."""
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_teacher_hacking_seeds as t; "
    )
    script += f"t._run({str(out)!r}, (0, 1), jobs={jobs})"
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(torch.get_num_threads()),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    while not until.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


def test_kill_9_in_the_second_seed_then_resume_gives_the_same_bytes(two_seeds, tmp_path):
    """A real SIGKILL right after seed 1's first distillation checkpoint, then a rerun."""
    _, reference = two_seeds
    killed = tmp_path / "killed"
    until = killed / "checkpoints" / "seed1" / "distill_offline_4x2.safetensors"
    proc = _start_run(killed, jobs=1, until=until)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "curves.json").exists(), "the run finished before it was killed"
    _run(killed, (0, 1))
    assert (killed / "curves.json").read_bytes() == (reference / "curves.json").read_bytes()


def test_monitor_skip_fits_after_the_initial_transient():
    steps = [0, 10, 20, 40, 80, 160]
    proxy = [5.0, 1.0, 0.5, 0.25, 0.125, 0.0625]
    golden = [5.0] + [0.8 * p**0.5 for p in proxy[1:]]  # step 0 off the law the later points follow
    plain, skipping = (
        TeacherHackingMonitor(fit_points=3, patience=1),
        TeacherHackingMonitor(fit_points=3, patience=1, skip=1),
    )
    for s, p, g in zip(steps, proxy, golden, strict=True):
        plain.update(s, proxy=p, golden=g)
        skipping.update(s, proxy=p, golden=g)
    assert skipping.fit[1] == pytest.approx(0.5) and skipping.departure_step is None
    assert plain.fit[1] > 0.5 and plain.departure_step is not None  # the transient bent its fit
    assert skipping.summary()["skip"] == 1
    with pytest.raises(ValueError, match="skip >= 0"):
        TeacherHackingMonitor(skip=-1)


@pytest.mark.parametrize(("field", "value"), [("tilt_on", "student"), ("tilt_key", "bogus")])
def test_bad_tilt_options_are_named_before_anything_is_written(tmp_path, field, value):
    bad = dataclasses.replace(preset_config("smoke"), **{field: value})
    with pytest.raises(ValueError, match=f"Preset.{field} must be one of"):
        run_teacher_hacking(bad, tmp_path / "run", progress=False, plots=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_seeds_in_parallel_workers_give_the_same_bytes(two_seeds, tmp_path):
    _, reference = two_seeds
    lines = []
    _run(tmp_path / "par", (0, 1), jobs=2, log=lines.append)
    assert (tmp_path / "par" / "curves.json").read_bytes() == (reference / "curves.json").read_bytes()
    assert any(line.startswith("[seed 1] stage 3") for line in lines)  # the workers' lines, labelled


def test_a_failing_worker_raises_its_error_here(two_seeds, tmp_path):
    import shutil

    _, reference = two_seeds
    out = tmp_path / "bad"
    shutil.copytree(reference, out)
    (out / "curves.json").unlink()
    ckpt = out / "checkpoints" / "seed1" / "teacher.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-3] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(experiment.CheckpointError, match="seed1/teacher.safetensors"):
        _run(out, (0, 1), jobs=2)


def test_bad_jobs_are_refused(tmp_path, capsys):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs must be an int >= 1"):
            _run(tmp_path / "x", (0, 1), jobs=bad)
    assert cli(["teacher-hacking", "--preset", "smoke", "--jobs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the workers")
def test_kill_9_of_the_parent_stops_its_workers_and_resume_gives_the_same_bytes(two_seeds, tmp_path):
    _, reference = two_seeds
    killed = tmp_path / "killed"
    proc = _start_run(killed, jobs=2, until=killed / "checkpoints" / "seed1" / "teacher.safetensors")
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "curves.json").exists(), "the run finished before it was killed"
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "workers outlived their parent"
        time.sleep(0.05)
    _run(killed, (0, 1), jobs=2)
    assert (killed / "curves.json").read_bytes() == (reference / "curves.json").read_bytes()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
