"""The RLHF experiments over several seeds: a seed's curves are the same alone or with others, the
aggregate's math and table cells, the ``--seeds`` flag, resume after an interruption in the second
seed, and WARP's prompt settings (``WARPConfig.prompts``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from utils import Interrupt, interrupt_rlhf_loops, restore_rlhf_loops

from fdistill.__main__ import main as cli
from fdistill.trainer.rlhf.bands import band_dict, same
from fdistill.trainer.rlhf.experiment import WARPConfig, preset_config, run_rlhf
from fdistill.trainer.rlhf.methods import bond, warp

QUIET = {"progress": False, "plots": False, "log": lambda *_: None}
SEEDS = (0, 1)
SEED_STEPS = 15 + 8 + 8  # bond smoke, per seed: SFT, J-BOND, one baseline run


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, one_thread):
    """(curves, out) of an uninterrupted J-BOND smoke run of seeds 0 and 1."""
    out = tmp_path_factory.mktemp("two") / "run"
    return run_rlhf("bond", "smoke", out, seeds=SEEDS, **QUIET), out


def test_seeds_in_one_run_match_separate_runs(two_seeds, tmp_path):
    both, out = two_seeds
    alone = run_rlhf("bond", "smoke", tmp_path / "one", seeds=(1,), **QUIET)
    assert json.dumps(both["per_seed"]["1"]) == json.dumps(alone["per_seed"]["1"])  # the same bytes
    assert both["seeds"] == [0, 1] and both["run"]["config"]["seeds"] == [0, 1]
    assert both["per_seed"]["0"]["jbond"]["true"] != both["per_seed"]["1"]["jbond"]["true"]
    for key in ("true", "kl"):
        band = both["jbond"][key]
        assert all(lo <= m <= hi for lo, m, hi in zip(band["min"], band["mean"], band["max"], strict=True))
    assert (out / "checkpoints" / "seed1" / "jbond.safetensors").exists()
    assert len(both["versus_baseline"]) == 2 and "mean_versus_baseline" in both
    assert both["per_seed"]["0"]["sft"] != both["per_seed"]["1"]["sft"]


def test_interrupted_in_the_second_seed_resumes_to_the_same_bytes(two_seeds, tmp_path, monkeypatch):
    _, reference = two_seeds
    interrupt_rlhf_loops(monkeypatch, SEED_STEPS + 15 + 6)  # seed 1's J-BOND, after its step-4 checkpoint
    out = tmp_path / "cut"
    with pytest.raises(Interrupt, match="J-BOND"):
        run_rlhf("bond", "smoke", out, seeds=SEEDS, **QUIET)
    assert not (out / "curves.json").exists()
    assert (out / "checkpoints" / "seed1" / "jbond.safetensors").exists()
    restore_rlhf_loops(monkeypatch)
    run_rlhf("bond", "smoke", out, seeds=SEEDS, **QUIET)
    assert (out / "curves.json").read_bytes() == (reference / "curves.json").read_bytes()
    assert (out / "summary.md").read_text() == (reference / "summary.md").read_text()


def _bond_seed(true, kl, base_true):
    steps = [0, 4, 8]
    run = {"steps": steps, "true": true, "kl": kl, "repeat": [0.1] * 3}
    baseline = {"RL beta=0.01": {"beta": 0.01, **run, "true": base_true}}
    points = list(zip(kl, true, strict=True))
    return {
        "sft": {"true": true[0], "kl": 0.0, "repeat": 0.1},
        "jbond": {**run, "loses_to_both": [0.5, 0.4]},
        "baseline": baseline,
        "versus_baseline": bond.versus_baseline(points, baseline),
    }


def test_aggregate_math_and_cells():
    per_seed = {
        "0": _bond_seed([0.2, 0.4, 0.6], [0.0, 1.0, 2.0], [0.2, 0.3, 0.5]),
        "5": _bond_seed([0.2, 0.6, 0.8], [0.0, 1.0, 4.0], [0.2, 0.5, 0.7]),
    }
    agg = bond.aggregate(per_seed)
    assert agg["jbond"]["true"] == {"mean": [0.2, 0.5, 0.7], "std": pytest.approx([0.0, 0.1, 0.1]),
                                    "min": [0.2, 0.4, 0.6], "max": [0.2, 0.6, 0.8]}  # fmt: skip
    assert agg["jbond"]["steps"] == [0, 4, 8] and agg["sft"]["true"]["mean"] == [0.2]
    assert agg["baseline"]["RL beta=0.01"]["beta"] == 0.01
    assert agg["baseline"]["RL beta=0.01"]["true"]["mean"] == pytest.approx([0.2, 0.4, 0.6])
    assert [v["above"] for v in agg["versus_baseline"]] == [2, 2]
    # the mean curve against the mean baseline's frontier: above by 0.1 at KL 1, 0.1 at KL 3
    assert agg["mean_versus_baseline"]["best_margin"] == pytest.approx(0.1)
    table = bond.summary({"seeds": [0, 5], **agg})
    assert table.startswith("Seeds 0, 5: mean (min–max over the seeds).")
    assert "| J-BOND | 0.700 (0.600–0.800) | 3.00 (2.00–4.00) |" in table
    assert "2, 2 of 3 per seed; best 0.100 (0.100–0.100)" in table
    one = bond.summary({"seeds": [0], **bond.aggregate({"0": per_seed["0"]})})
    assert "| J-BOND | 0.600 | 2.00 | 0.600 @ KL 2.00 | 2/3; best +0.100 @ KL " in one
    assert "Seeds" not in one and "mean curve" not in one
    with pytest.raises(ValueError, match="differ in steps"):
        band_dict([{"steps": [0, 4]}, {"steps": [0, 5]}], fixed=("steps",))
    with pytest.raises(ValueError, match="differ"):
        same([1, 2], "x")


def test_seeds_flag_and_bad_values(tmp_path, capsys):
    out = tmp_path / "x"
    for text in ("0,x", "1,1", ""):
        assert cli(["rlhf", "--method", "bond", "--preset", "smoke", "--seeds", text, "--out", str(out)]) == 2
        assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # --seed and --seeds exclude each other
        cli(["rlhf", "--method", "bond", "--seed", "1", "--seeds", "1,2", "--out", str(out)])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    for bad in ((), (0, 0), (1.5,)):
        with pytest.raises(ValueError, match="seeds must be"):
            run_rlhf("bond", "smoke", out, seeds=bad, **QUIET)
    assert not out.exists()
    assert preset_config("tiny").seeds == (0, 1, 2) and preset_config("smoke").seeds == (0,)


def test_warp_prompt_shares_are_disjoint_and_cover_both_halves():
    cfg = preset_config("smoke")

    class Ctx:
        task = cfg.task

    Ctx.cfg = cfg
    assert warp.prompt_share(Ctx, "shared", 0) is None
    shares = [warp.prompt_share(Ctx, "disjoint", m)(512, torch.Generator().manual_seed(3)) for m in (0, 1)]
    plain = cfg.task.prompts(512, torch.Generator().manual_seed(3))
    for m, x in enumerate(shares):
        assert (x[:, 1] % 2 == m).all() and (x[:, 1] < cfg.task.vocab).all()
        assert torch.equal(x[:, [0, 2, 3]], plain[:, [0, 2, 3]])  # only the second token moves
        first_half = x[:, 0] < cfg.task.vocab // 2  # the token that picks the good set: both halves
        assert 0.3 < first_half.float().mean() < 0.7
    with pytest.raises(ValueError, match="warp.prompts must be one of"):
        warp.check(dataclasses.replace(cfg, warp=WARPConfig(prompts="random")))
    short = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, prompt_len=1))
    with pytest.raises(ValueError, match="second token"):
        warp.check(dataclasses.replace(short, warp=WARPConfig(prompts="disjoint")))
    warp.check(dataclasses.replace(short, warp=WARPConfig(cosine_probe=False)))  # shared: any prompts


def test_warp_disjoint_prompts_run_and_report_both_cosines(tmp_path):
    smoke = preset_config("smoke")
    cfg = dataclasses.replace(smoke, warp=dataclasses.replace(smoke.warp, prompts="disjoint", iterations=1))
    curves = run_rlhf("warp", cfg, tmp_path / "run", **QUIET)
    seed = curves["per_seed"]["0"]
    assert set(seed["cosine"]) == {"shared", "disjoint"}
    assert seed["cosine"]["disjoint"] == seed["iterations"][0]["task_vector_cosine"]
    assert -1 <= seed["cosine"]["shared"] <= 1 and seed["cosine"]["shared"] != seed["cosine"]["disjoint"]
    assert curves["cosine"]["shared"]["mean"] == [seed["cosine"]["shared"]]
    probe = tmp_path / "run" / "checkpoints" / "seed0" / "WARP_it0_policy1__shared_prompts.safetensors"
    assert probe.exists()


def test_seeds_in_parallel_workers_give_the_same_bytes(two_seeds, tmp_path):
    _, reference = two_seeds
    lines = []
    run_rlhf("bond", "smoke", tmp_path / "par", seeds=SEEDS, jobs=2, **{**QUIET, "log": lines.append})
    assert (tmp_path / "par" / "curves.json").read_bytes() == (reference / "curves.json").read_bytes()
    assert any(line.startswith("[seed 1] ") for line in lines)


def test_parallel_seeds_need_a_picklable_reward_and_jobs_at_least_one(tmp_path, capsys):
    with pytest.raises(ValueError, match="reward_fn must be picklable"):
        reward = lambda x, y: y.float().mean(1)  # noqa: E731 (a lambda: not picklable)
        run_rlhf("bond", "smoke", tmp_path / "x", seeds=SEEDS, jobs=2, reward_fn=reward, **QUIET)
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        run_rlhf("bond", "smoke", tmp_path / "x", seeds=SEEDS, jobs=0, **QUIET)
    assert (
        cli(["rlhf", "--method", "bond", "--preset", "smoke", "--jobs", "0", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
