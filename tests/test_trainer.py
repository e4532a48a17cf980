"""The trainer: the transformer's log-probs and sampling, the metrics, the teacher-hacking monitor,
checkpoints and resume, bad input, and a smoke run of the experiment."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import fdistill
from fdistill.__main__ import main as cli
from fdistill.trainer import (
    CheckpointError,
    LMConfig,
    OfflineData,
    Task,
    TeacherHackingMonitor,
    TiltedLM,
    TinyLM,
    distillation_loss,
    fit_power_law,
    load_checkpoint,
    save_checkpoint,
    sequence_kl,
)
from fdistill.trainer.distill import check_compatible
from fdistill.trainer.experiment import _train, plot_curves, preset_config, run_teacher_hacking

CFG = LMConfig(vocab=17, width=32, depth=2, heads=4, context=20, head_scale=3.0)


def model(seed, cfg=CFG):
    torch.manual_seed(seed)
    return TinyLM(cfg).double()


def sequences(seed, n=6, length=20, vocab=17):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the model


def test_logprobs_match_step_by_step_recomputation(seed):
    m, seqs, prompt = model(seed), sequences(seed), 5
    got = m.sequence_logprobs(seqs, prompt)
    for n in range(prompt, seqs.shape[1]):
        step = m(seqs[:, :n])[:, -1].log_softmax(-1).gather(-1, seqs[:, n : n + 1]).squeeze(-1)
        torch.testing.assert_close(got[:, n - prompt], step)


def test_attention_window_hides_older_tokens(seed):
    m = model(seed, LMConfig(vocab=17, width=32, depth=2, heads=4, context=20, attn_window=3))
    seqs = sequences(seed)
    changed = seqs.clone()
    changed[:, :10] = (changed[:, :10] + 1) % 17
    # depth 2 x window 3: position t sees tokens t-4 .. t; positions >= 14 never see tokens < 10
    torch.testing.assert_close(m(seqs)[:, 14:], m(changed)[:, 14:])
    assert not torch.allclose(m(seqs)[:, 11], m(changed)[:, 11])


def test_tilted_lm_adds_the_bigram_tilt_of_the_current_token(seed):
    base, seqs = model(seed), sequences(seed)
    tilted = TiltedLM(base, 0.5, torch.Generator().manual_seed(seed)).double()
    table = tilted.table
    assert table.shape == (17, 17) and 0.3 < float(table.std()) < 0.7
    torch.testing.assert_close(tilted(seqs), base(seqs) + table[seqs])
    # completion log-probs are the tilted distribution's (the teacher's training target)
    want = (base(seqs[:, :-1]) + table[seqs[:, :-1]]).log_softmax(-1)[:, 4:]
    want = want.gather(-1, seqs[:, 5:, None]).squeeze(-1)
    torch.testing.assert_close(tilted.sequence_logprobs(seqs, 5), want)
    assert tilted.sample(seqs[:, :5], 3, generator=torch.Generator().manual_seed(0)).shape == (6, 8)
    torch.testing.assert_close(TiltedLM(base, 0.0, torch.Generator()).double()(seqs), base(seqs))
    with pytest.raises(ValueError, match="scale"):
        TiltedLM(base, -1.0, torch.Generator())


def test_sampling_top_k_and_temperature(seed):
    m = model(seed)
    prompts = sequences(seed, n=4, length=4)
    greedy = m.sample(prompts, 6, top_k=1)
    for n in range(4, 10):  # top-1 is the argmax path
        assert torch.equal(greedy[:, n], m(greedy[:, :n])[:, -1].argmax(-1))
    top3 = m.sample(prompts, 6, top_k=3, generator=torch.Generator().manual_seed(seed))
    for n in range(4, 10):
        allowed = m(top3[:, :n])[:, -1].topk(3, -1).indices
        assert bool((allowed == top3[:, n : n + 1]).any(-1).all())
    # one step from one prompt, many times: frequencies follow softmax(logits / T)
    prompt = prompts[:1].expand(20000, -1)
    for temperature in (0.5, 2.0):
        draws = m.sample(prompt, 1, temperature=temperature, generator=torch.Generator().manual_seed(seed))[
            :, -1
        ]
        freq = torch.bincount(draws, minlength=17).double() / draws.numel()
        want = (m(prompts[:1])[0, -1] / temperature).softmax(-1)
        assert (freq - want).abs().sum() / 2 < 0.03, temperature
    with pytest.raises(ValueError, match="top_k"):
        m.sample(prompts, 2, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(prompts, 2, temperature=0.0)
    with pytest.raises(ValueError, match="exceeds context"):
        m.sample(prompts, 30)


def test_metrics_equal_a_direct_computation(seed):
    ref, student, seqs, prompt = model(seed), model(seed + 1), sequences(seed), 5
    p = ref(seqs[:, :-1])[:, prompt - 1 :].log_softmax(-1)
    q = student(seqs[:, :-1])[:, prompt - 1 :].log_softmax(-1)
    want = (p.exp() * (p - q)).sum(-1).mean()
    assert math.isclose(sequence_kl(ref, student, seqs, prompt), want.item(), rel_tol=1e-10)
    assert sequence_kl(ref, ref, seqs, prompt) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "reverse_kl"])
def test_fused_distillation_loss_equals_the_plain_one(divergence, seed):
    teacher, student, seqs = model(seed), model(seed + 1), sequences(seed)
    plain = distillation_loss(student, teacher, seqs, 5, divergence)
    (g_plain,) = torch.autograd.grad(plain, student.lm_head.weight)
    fused = distillation_loss(student, teacher, seqs, 5, divergence, fused=True)
    (g_fused,) = torch.autograd.grad(fused, student.lm_head.weight)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(g_fused, g_plain)
    assert distillation_loss(student, teacher, seqs, 5, "fy") > 0


# ----------------------------------------------------------------------------- the monitor


def test_monitor_does_not_flag_a_clean_power_law():
    monitor = TeacherHackingMonitor(fit_points=5, tolerance=0.05, patience=2)
    for step in range(10, 1001, 10):
        proxy = 2.0 * step**-0.7
        assert not monitor.update(step, proxy=proxy, golden=0.5 * proxy**0.8)
    summary = monitor.summary()
    assert summary["departure_step"] is None and summary["hacking_step"] is None
    assert summary["fit"]["exponent"] == pytest.approx(0.8)


def test_monitor_flags_golden_turning_up_while_proxy_falls():
    monitor = TeacherHackingMonitor(fit_points=5, tolerance=0.05, patience=2)
    events = []
    for step in range(10, 1001, 10):
        proxy = 2.0 * step**-0.7
        golden = 0.5 * proxy**0.8 + (0.002 * (step - 300) if step > 300 else 0.0)  # U-shaped
        events += monitor.update(step, proxy=proxy, golden=golden)
    assert monitor.departure_step is not None and 300 < monitor.departure_step < 600
    assert monitor.hacking_step is not None and monitor.departure_step <= monitor.hacking_step < 800
    assert len(events) == 2


def test_monitor_golden_vs_step_law_and_bad_input():
    monitor = TeacherHackingMonitor(law="golden_vs_step", fit_points=4, tolerance=0.05, patience=1)
    for step in (10, 20, 40, 80, 160, 320):
        monitor.update(step, proxy=1.0, golden=step**-0.5)
    assert monitor.departure_step is None and monitor.summary()["fit"]["exponent"] == pytest.approx(-0.5)
    monitor.update(640, proxy=1.0, golden=1.0)
    assert monitor.departure_step == 640
    with pytest.raises(ValueError, match="steps must increase"):
        monitor.update(640, proxy=1.0, golden=1.0)
    with pytest.raises(ValueError, match="law"):
        TeacherHackingMonitor(law="loss_vs_step")
    assert fit_power_law([1, 10, 100], [3, 30, 300]) == pytest.approx((math.log(3), 1.0))


# ----------------------------------------------------------------------------- checkpoints


def _offline_run(tmp_path, steps, seed):
    """(losses, model) of a short offline distillation run checkpointed at tmp_path/run.safetensors."""
    torch.manual_seed(seed)
    teacher, student = TinyLM(CFG), TinyLM(CFG)
    task = Task(17, 4, 8)
    gen = torch.Generator().manual_seed(seed)
    data = OfflineData(teacher, task, prompts=6, generations=2, generator=gen)
    record = _train(
        student,
        "student",
        tmp_path / "run.safetensors",
        steps,
        lambda: data.batch(5, gen),
        lambda s: distillation_loss(student, teacher, s, 4),
        1e-2,
        gen,
        data=data,
        progress=False,
    )
    return [t["loss"] for t in record["train"]], student


def test_resume_gives_the_same_next_losses(tmp_path, seed):
    full, full_model = _offline_run(tmp_path / "a", 7, seed)
    _offline_run(tmp_path / "b", 4, seed)  # "interrupted" after 4 steps (checkpoint written)
    resumed, resumed_model = _offline_run(tmp_path / "b", 7, seed)  # fresh objects, resumes at step 5
    assert resumed == full  # bitwise: model, Adam state, random stream and data order restored
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_errors_and_atomic_writes(tmp_path, seed):
    m = model(seed)
    path = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(path, models={"m": m})
    save_checkpoint(path, models={"m": m}, meta={"step": 3})
    before = path.read_bytes()
    with pytest.raises(TypeError):  # a failing save (meta not JSON-able) leaves the old file intact
        save_checkpoint(path, models={"m": m}, meta={"bad": object()})
    assert path.read_bytes() == before and not (tmp_path / "m.safetensors.tmp").exists()
    assert load_checkpoint(path, models={"m": m}) == {"step": 3}
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(path, models={"m": TinyLM(LMConfig(vocab=17, width=16, heads=4, context=20))})
    path.write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, models={"m": m})


# ----------------------------------------------------------------------------- bad input and the experiment


def test_bad_input():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="vocab"):
        check_compatible(
            TinyLM(CFG), TinyLM(LMConfig(vocab=18, width=32, heads=4, context=20)), Task(17, 4, 8)
        )
    with pytest.raises(ValueError, match="context"):
        check_compatible(TinyLM(CFG), TinyLM(CFG), Task(17, 10, 20))
    with pytest.raises(ValueError, match="divergence must be one of"):
        distillation_loss(TinyLM(CFG), TinyLM(CFG), sequences(0), 5, "kl")
    with pytest.raises(ValueError, match="multiple of heads"):
        LMConfig(width=30, heads=4)


def test_experiment_smoke_run_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    curves = run_teacher_hacking("smoke", out, progress=False, log=lambda *_: None)
    saved = json.loads((out / "curves.json").read_text())
    assert set(saved["sources"]) == {"offline 8x1", "online teacher"}
    for c in saved["sources"].values():
        assert len(c["steps"]) == len(c["proxy"]["mean"]) == len(c["golden"]["max"]) == 5
        assert c["steps"][-1] == 40 and all(v >= 0 for v in c["proxy"]["min"] + c["golden"]["min"])
    assert (out / "curves.png").stat().st_size > 0 and (out / "golden_vs_proxy.png").stat().st_size > 0
    assert "| data source |" in (out / "summary.md").read_text()
    # the step law's fit and flags are drawn on the golden-vs-step panel instead
    stepped = copy.deepcopy(saved)
    for c in stepped["sources"].values():
        c["monitor"] |= {"law": "golden_vs_step", "departure_step": c["steps"][-1]}
    paths = plot_curves(stepped, tmp_path)
    assert [p.name for p in paths] == ["curves.png", "golden_vs_proxy.png"] and paths[0].stat().st_size > 0
    # a rerun resumes from the finished checkpoints and reproduces the curves
    again = run_teacher_hacking("smoke", out, progress=False, plots=False, log=lambda *_: None)
    assert again["sources"] == curves["sources"]
    # the same directory with another configuration is refused, nothing is overwritten
    assert (
        cli(["teacher-hacking", "--preset", "smoke", "--out", str(out), "--seed", "1", "--no-progress"]) == 2
    )
    assert "another configuration" in capsys.readouterr().err
    assert json.loads((out / "curves.json").read_text()) == saved
    assert cli(["teacher-hacking", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert (
        cli(["teacher-hacking", "--preset", "smoke", "--divergence", "kl", "--out", str(tmp_path / "y")]) == 2
    )
    assert "unknown divergence" in capsys.readouterr().err


def test_corrupt_stage_checkpoint_is_reported(tmp_path, capsys):
    out = tmp_path / "run"
    run_teacher_hacking("smoke", out, progress=False, plots=False, log=lambda *_: None)
    (out / "checkpoints" / "seed0" / "teacher.safetensors").write_bytes(b"garbage")
    assert (
        cli(["teacher-hacking", "--preset", "smoke", "--out", str(out), "--no-progress", "--no-plots"]) == 2
    )
    assert "seed0/teacher.safetensors is corrupt" in capsys.readouterr().err


def test_package_exports_the_losses_the_trainer_uses():
    assert "forward_kl" in fdistill.trainer.LOSSES and "fy" in fdistill.trainer.LOSSES
