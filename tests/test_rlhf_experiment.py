"""The RLHF experiments (fdistill.trainer.rlhf.experiment) on their smoke preset: outputs, resume
after an interruption, the output-directory claim, bad input; and the synthetic task's reward and
preference labels."""

from __future__ import annotations

import json

import pytest
import torch
from utils import Interrupt, interrupt_rlhf_loops, restore_rlhf_loops

from fdistill.__main__ import main as cli
from fdistill.trainer import LMConfig, TinyLM
from fdistill.trainer.rlhf import experiment
from fdistill.trainer.rlhf.experiment import METHODS, RLHFPreset, preset_config, run_rlhf
from fdistill.trainer.rlhf.task import RewardTask

QUIET = {"progress": False, "log": lambda *_: None}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors


# ----------------------------------------------------------------------------- the task


def test_true_reward_by_hand():
    task = RewardTask(vocab=8, prompt_len=2, length=6, good=2, set_seed=3)
    g0, g1 = task.good_sets().tolist()
    assert not set(g0) & set(g1) and len(g0) == len(g1) == 2
    other = next(t for t in range(8) if t not in g0 + g1)
    x = torch.tensor([[0, 5], [7, 1]])  # first prompt token < 4 selects G_0, >= 4 selects G_1
    y = torch.tensor(
        [
            [g0[0], g0[0], g0[1], other, g1[0], g0[1]],  # good & fresh at 0, 2, 5 -> 3/6
            [g1[0], g1[1], g1[0], g1[1], g1[1], g0[0]],  # good & fresh at 0..3 (4 repeats 3) -> 4/6
        ]
    )
    torch.testing.assert_close(task.true_reward(x, y), torch.tensor([3 / 6, 4 / 6]))
    assert task.repeat_rate(y) == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="at most vocab / 2"):
        RewardTask(vocab=8, good=5)
    with pytest.raises(ValueError, match="share B"):
        task.true_reward(x, y[:1])


def test_preferences_follow_the_bradley_terry_annotator(seed):
    task = RewardTask(vocab=8, prompt_len=2, length=6, good=2)
    torch.manual_seed(seed)
    policy = TinyLM(LMConfig(vocab=8, width=16, depth=1, heads=2, context=8))
    gen = torch.Generator().manual_seed(seed)
    sharp = task.preferences(policy, 256, gen, temperature=1e-4)  # noiseless: the better one wins
    strict = sharp["r_chosen"] != sharp["r_rejected"]
    assert strict.float().mean() > 0.3 and (sharp["r_chosen"] > sharp["r_rejected"])[strict].all()
    torch.testing.assert_close(
        task.true_reward(sharp["chosen"][:, :2], sharp["chosen"][:, 2:]), sharp["r_chosen"]
    )
    flat = task.preferences(policy, 256, gen, temperature=1e3)  # coin flips
    right = (flat["r_chosen"] > flat["r_rejected"])[flat["r_chosen"] != flat["r_rejected"]]
    assert 0.3 < right.float().mean() < 0.7
    with pytest.raises(ValueError, match="temperature"):
        task.preferences(policy, 4, gen, temperature=0.0)


# ----------------------------------------------------------------------------- smoke runs


@pytest.mark.parametrize("method", METHODS)
def test_smoke_run_outputs(tmp_path, method):
    out = tmp_path / method
    aggregated = run_rlhf(method, "smoke", out, **QUIET)
    assert aggregated["seeds"] == [0] and list(aggregated["per_seed"]) == ["0"]
    curves = aggregated["per_seed"]["0"]  # one seed's curves; the aggregate's bands are its numbers
    assert set(curves) <= set(aggregated) | {"train_label_agreement", "versus_baseline", "cosine"}
    saved = json.loads((out / "curves.json").read_text())
    assert saved["run"]["method"] == method and json.loads((out / "run.json").read_text()) == saved["run"]
    assert (out / "checkpoints" / "seed0").is_dir()
    assert (out / "summary.md").read_text().count("|---|") >= 1
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all((out / p).stat().st_size > 1000 for p in pngs)
    cfg = preset_config("smoke")
    if method != "irl":
        assert abs(curves["sft"]["kl"]) < 1e-6  # the SFT policy against itself: no KL
    if method == "rl":
        assert len(curves["runs"]) == len(cfg.rl.betas) + len(cfg.rl.proxy_betas)
        for run in curves["runs"].values():
            assert run["steps"] == [0, 4, 8] and run["true"][0] == curves["sft"]["true"]
            assert all(k > -1e-6 for k in run["kl"]) and run["kl"][-1] > 0
        # the proxy is calibrated to the true reward on SFT samples: close on (other) SFT samples
        assert abs(curves["sft"]["proxy"] - curves["sft"]["true"]) < 0.2
    if method == "warp":
        first = curves["iterations"][0]
        eta0 = first["front"][0]
        assert eta0["eta"] == 0 and abs(eta0["kl"]) < 1e-6 and eta0["true"] == curves["sft"]["true"]
        second = curves["iterations"][1]["front"][0]  # η = 0 of iteration 2 is iteration 1's LITI point
        assert second["true"] == first["liti"]["true"] and second["kl"] == first["liti"]["kl"]
        assert len(curves["versus_baseline"]) == cfg.warp.iterations
    if method == "bond":
        assert curves["jbond"]["steps"][-1] == cfg.bond.steps and curves["jbond"]["kl"][-1] > 0
        assert all(0 <= f <= 1 for f in curves["jbond"]["loses_to_both"])
    if method == "warm":
        names = set(curves["accuracy"])
        assert names == {"RM 0", "RM 1", "ensemble", "WARM"}
        for acc in curves["accuracy"].values():
            assert 0 <= acc["heldout"]["accuracy"] <= 1 and 0 <= acc["shifted"]["accuracy"] <= 1
        bon = curves["best_of_n"]
        assert bon["true reward (oracle BoN)"]["true"][0] <= bon["true reward (oracle BoN)"]["true"][-1]
        for name in curves["rl"]:  # best-of-N by a proxy never beats best-of-N by the true reward
            assert all(
                a <= b + 1e-6
                for a, b in zip(bon[name]["true"], bon["true reward (oracle BoN)"]["true"], strict=True)
            )
    if method == "irl":
        assert [r["lambda"] for r in curves["runs"].values()] == list(cfg.irl.lambdas)
        for run in curves["runs"].values():
            assert all(k > 0 for k in run["kl"]) and -1 <= run["reward_corr_token"][-1] <= 1


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_an_interruption_gives_identical_outputs(tmp_path, monkeypatch, method):
    full = run_rlhf(method, "smoke", tmp_path / "full", plots=False, **QUIET)
    # stop at the k-th training step overall: mid-way through a stage after a periodic checkpoint
    interrupt_rlhf_loops(monkeypatch, {"rl": 22, "warp": 46, "bond": 22, "warm": 30, "irl": 7}[method])
    with pytest.raises(Interrupt):
        run_rlhf(method, "smoke", tmp_path / "resumed", plots=False, **QUIET)
    assert not (tmp_path / "resumed" / "curves.json").exists()
    restore_rlhf_loops(monkeypatch)
    logged = []
    resumed = run_rlhf(method, "smoke", tmp_path / "resumed", plots=False, progress=False, log=logged.append)
    assert any("resuming" in line for line in logged)
    assert json.loads(json.dumps(resumed)) == json.loads(json.dumps(full))
    # and a finished run reruns from its checkpoints to the same curves without training
    interrupt_rlhf_loops(monkeypatch, 1)
    assert run_rlhf(method, "smoke", tmp_path / "resumed", plots=False, **QUIET) == resumed


# ----------------------------------------------------------------------------- claims and bad input


def test_out_dir_holding_another_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    run_rlhf("irl", "smoke", out, plots=False, **QUIET)
    before = (out / "curves.json").read_text()
    with pytest.raises(ValueError, match="another configuration"):
        run_rlhf("irl", "smoke", out, seeds=(1,), plots=False, **QUIET)
    with pytest.raises(ValueError, match="another configuration"):
        run_rlhf("rl", "smoke", out, plots=False, **QUIET)
    assert (
        cli(
            [
                "rlhf",
                "--method",
                "irl",
                "--preset",
                "smoke",
                "--out",
                str(out),
                "--seed",
                "2",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "another configuration" in capsys.readouterr().err
    assert (out / "curves.json").read_text() == before
    # --fresh deletes the old run first
    assert (
        cli(
            [
                "rlhf",
                "--method",
                "irl",
                "--preset",
                "smoke",
                "--out",
                str(out),
                "--seed",
                "2",
                "--no-progress",
                "--no-plots",
                "--fresh",
            ]
        )
        == 0
    )
    assert json.loads((out / "run.json").read_text())["config"]["seeds"] == [2]


def test_corrupt_stage_checkpoint_is_reported(tmp_path, capsys):
    out = tmp_path / "run"
    run_rlhf("bond", "smoke", out, plots=False, **QUIET)
    (out / "checkpoints" / "seed0" / "sft.safetensors").write_bytes(b"garbage")
    assert cli(["rlhf", "--method", "bond", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 2
    assert "sft.safetensors is corrupt" in capsys.readouterr().err


def test_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method"):
        run_rlhf("ppo", "smoke", tmp_path / "a", **QUIET)
    with pytest.raises(ValueError, match="unknown preset"):
        run_rlhf("rl", "huge", tmp_path / "b", **QUIET)
    assert cli(["rlhf", "--method", "ppo", "--out", str(tmp_path / "c")]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli(["rlhf", "--method", "rl", "--preset", "huge", "--out", str(tmp_path / "d")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing claimed
    with pytest.raises(ValueError, match="exactly 2 policies"):
        run_rlhf("warp", RLHFPreset(warp=experiment.WARPConfig(policies=3)), tmp_path / "e", **QUIET)
    with pytest.raises(ValueError, match="group must be >= 2"):
        run_rlhf("rl", RLHFPreset(group=1), tmp_path / "f", **QUIET)


@pytest.mark.parametrize(
    "reward_fn, match",
    [
        (lambda x, y: torch.zeros(x.shape[0], 1), r"shape \(4,\)"),
        (lambda x, y: torch.full((x.shape[0],), float("nan")), "NaN"),
        (lambda x, y: (y == 3).sum(-1), "floating"),
    ],
)
def test_bad_reward_fn_fails_fast(tmp_path, reward_fn, match):
    with pytest.raises(ValueError, match=match):
        run_rlhf("rl", "smoke", tmp_path / "run", reward_fn=reward_fn, **QUIET)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_reward_fn_going_bad_during_training_is_reported(tmp_path):
    calls = [0]

    def reward_fn(prompts, completions):
        calls[0] += 1
        r = (completions == 3).float().mean(-1)
        return r if calls[0] < 4 else r.masked_fill(completions[:, 0] == completions[:, 1], float("inf"))

    with pytest.raises(ValueError, match="returned inf"):
        run_rlhf("bond", "smoke", tmp_path / "run", reward_fn=reward_fn, plots=False, **QUIET)


def test_custom_reward_fn_is_the_optimised_reward(tmp_path):
    def count_token_3(prompts, completions):
        return (completions == 3).float().mean(-1)

    aggregated = run_rlhf("bond", "smoke", tmp_path / "run", reward_fn=count_token_3, plots=False, **QUIET)
    assert aggregated["run"]["reward"].endswith("count_token_3")
    curves = aggregated["per_seed"]["0"]
    for run in curves["baseline"].values():  # the "true" metric is the custom reward
        assert all(0 <= r <= 1 for r in run["true"])
        assert run["true"][0] == curves["sft"]["true"]
