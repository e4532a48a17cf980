"""RLHF building blocks (fdistill.trainer.rlhf): weight merges, reward models, KL-regularised
REINFORCE, BOND / J-BOND rewards and the TD-regularised MLE loss of inverse RL."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from fdistill.trainer import LMConfig, TinyLM
from fdistill.trainer.rlhf import (
    RewardModel,
    average,
    best_of_n,
    bond_log_ratio_reward,
    bradley_terry_loss,
    check_rewards,
    ema_update,
    empirical_quantile,
    ensemble,
    extracted_rewards,
    jbond_reward,
    jeffreys_loss,
    kl_to_anchor,
    liti,
    policy_gradient_loss,
    regression_loss,
    rl_step,
    slerp,
    td_regularised_mle_loss,
    warm,
)

CFG = LMConfig(vocab=8, width=16, depth=1, heads=2, context=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors


def state(seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g, dtype=torch.float64).to(dtype),
        "b": torch.randn(5, generator=g, dtype=torch.float64).to(dtype),
        "count": torch.tensor([7]),
    }


def close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], **tol)


# ----------------------------------------------------------------------------- merges


def test_slerp_matches_closed_form(seed):
    init, a, b, lam = state(seed), state(seed + 1), state(seed + 2), 0.3
    out = slerp(init, a, b, lam)
    for key in ("w", "b"):
        d1, d2 = a[key] - init[key], b[key] - init[key]
        u1, u2 = d1 / d1.norm(), d2 / d2.norm()
        omega = 2 * math.atan2(float((u1 - u2).norm()), float((u1 + u2).norm()))  # angle, another way
        want = init[key] + (math.sin((1 - lam) * omega) * d1 + math.sin(lam * omega) * d2) / math.sin(omega)
        torch.testing.assert_close(out[key], want)
        assert not torch.allclose(out[key], init[key] + (1 - lam) * d1 + lam * d2)  # not linear
    assert torch.equal(out["count"], init["count"])


def test_slerp_endpoints_parallel_and_zero_task_vectors(seed):
    init, a, b = state(seed), state(seed + 1), state(seed + 2)
    close(slerp(init, a, b, 0.0), a)
    close(slerp(init, a, b, 1.0), b)
    # b's task vector is 2.5 x a's: Ω = 0, the task vectors are interpolated linearly
    parallel = {k: init[k] + 2.5 * (a[k] - init[k]) if k != "count" else init[k] for k in init}
    linear = {k: init[k] + 0.6 * (a[k] - init[k]) + 0.4 * (parallel[k] - init[k]) for k in ("w", "b")}
    close(slerp(init, a, parallel, 0.4), {**linear, "count": init["count"]})
    # b == init: a zero task vector, so (1 - λ) δ_1
    close(
        slerp(init, a, init, 0.4),
        {**{k: init[k] + 0.6 * (a[k] - init[k]) for k in ("w", "b")}, "count": init["count"]},
    )


def test_slerp_keeps_the_dtype():
    init, a, b = state(1, torch.float32), state(2, torch.float32), state(3, torch.float32)
    want = slerp(
        *(({k: v.double() if v.is_floating_point() else v for k, v in sd.items()}) for sd in (init, a, b))
    )
    out = slerp(init, a, b)
    assert out["w"].dtype == torch.float32
    torch.testing.assert_close(out["w"], want["w"].float())


def test_liti_interpolates_towards_the_init(seed):
    init, merged = state(seed), state(seed + 1)
    close(liti(init, merged, 1.0), merged)
    close(liti(init, merged, 0.0), init)
    out = liti(init, merged, 0.3)
    torch.testing.assert_close(out["w"], 0.7 * init["w"] + 0.3 * merged["w"])


def test_average_identity_and_weighted_closed_form(seed):
    sd = state(seed)
    close(average([sd, sd, sd]), sd)
    a, b = state(seed + 1), state(seed + 2)
    out = average([a, b], weights=[1.0, 3.0])
    torch.testing.assert_close(out["w"], (a["w"] + 3 * b["w"]) / 4)
    torch.testing.assert_close(out["b"], (a["b"] + 3 * b["b"]) / 4)
    torch.testing.assert_close(average([a, b])["w"], (a["w"] + b["w"]) / 2)
    low = average([state(seed + 1, torch.bfloat16), state(seed + 2, torch.bfloat16)])
    assert low["w"].dtype == torch.bfloat16 and torch.equal(low["count"], a["count"])
    torch.testing.assert_close(low["w"], ((a["w"] + b["w"]) / 2).bfloat16(), atol=1e-2, rtol=1e-2)


def test_ema_update_in_place(seed):
    torch.manual_seed(seed)
    anchor, model = TinyLM(CFG), TinyLM(CFG)
    weight = anchor.lm_head.weight
    before = copy.deepcopy(anchor.state_dict())
    ema_update(anchor, model, 0.0)
    close(anchor.state_dict(), before)
    ema_update(anchor, model, 0.25)
    assert anchor.lm_head.weight is weight  # in place
    torch.testing.assert_close(weight, 0.75 * before["lm_head.weight"] + 0.25 * model.lm_head.weight)
    ema_update(anchor.state_dict(), model.state_dict(), 1.0)
    close(anchor.state_dict(), model.state_dict())


def _bad_merges():
    a, b = state(1), state(2)
    missing = {k: v for k, v in b.items() if k != "b"}
    extra = {**b, "z": torch.zeros(1)}
    reshaped = {**b, "w": torch.zeros(3, 5, dtype=torch.float64)}
    counted = {**b, "count": torch.tensor([8])}
    return [
        ("empty", lambda: average([]), r"state_dicts is empty"),
        ("missing", lambda: average([a, missing]), r"state_dicts\[1\] .*missing \['b'\]"),
        ("extra", lambda: average([a, extra]), r"state_dicts\[1\] .*extra \['z'\]"),
        ("shape", lambda: average([a, reshaped]), r"state_dicts\[1\]\['w'\] has shape \(3, 5\).*\(3, 4\)"),
        ("int-buffer", lambda: average([a, counted]), r"state_dicts\[1\]\['count'\] differs"),
        ("weights-length", lambda: average([a, b], [1.0]), r"weights has 1 entries for 2"),
        ("weights-negative", lambda: average([a, b], [1.0, -1.0]), r"weights must be >= 0"),
        ("weights-zero-sum", lambda: average([a, b], [0.0, 0.0]), r"weights must have a positive"),
        ("lam-high", lambda: slerp(a, b, b, 1.5), r"lam must be in \[0, 1\]"),
        ("lam-low", lambda: slerp(a, b, b, -0.1), r"lam must be in \[0, 1\]"),
        ("lam-nan", lambda: slerp(a, b, b, math.nan), r"lam must be in \[0, 1\]"),
        ("slerp-shape", lambda: slerp(a, b, reshaped), r"b\['w'\] has shape \(3, 5\) but init\['w'\]"),
        ("eta", lambda: liti(a, b, 2.0), r"eta must be in \[0, 1\]"),
        ("liti-keys", lambda: liti(a, missing, 0.5), r"merged does not have the keys of init"),
        ("mu", lambda: ema_update(a, b, -1.0), r"mu must be in \[0, 1\]"),
        ("ema-keys", lambda: ema_update(a, extra, 0.5), r"model does not have the keys of anchor"),
    ]


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in _bad_merges()], ids=[c[0] for c in _bad_merges()])
def test_merge_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- BOND / J-BOND


def test_best_of_n_picks_the_argmax_of_each_group(seed):
    rewards = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.0])
    assert best_of_n(rewards, 3).tolist() == [1, 3]
    assert best_of_n(rewards, 2).tolist() == [1, 3, 4]
    assert best_of_n(rewards, 1).tolist() == list(range(6))
    r = torch.randn(40, generator=torch.Generator().manual_seed(seed))
    assert best_of_n(r, 4).tolist() == [4 * i + int(r[4 * i : 4 * i + 4].argmax()) for i in range(10)]
    for n in (0, -1):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            best_of_n(rewards, n)
    with pytest.raises(ValueError, match="rewards must be"):
        best_of_n(rewards, 4)


def test_empirical_quantile_and_bond_reward_on_a_toy_distribution():
    reference = torch.tensor([1.0, 2.0, 2.0, 3.0])  # k = 4 reference rewards
    reward = torch.tensor([2.0, 0.5, 3.0, 2.5])
    q = empirical_quantile(reward, reference)
    # 2 ties with two references: #{1, 2, 2} = 3 (ties count as "not better")
    assert q.tolist() == [0.75, 0.0, 1.0, 0.75]
    per_prompt = torch.tensor(
        [[1.0, 2.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], [4.0, 4.0, 4.0, 4.0], [3.0, 3.0, 3.0, 3.0]]
    )
    assert empirical_quantile(reward, per_prompt).tolist() == [0.75, 0.25, 0.0, 0.0]
    torch.testing.assert_close(
        bond_log_ratio_reward(torch.tensor([0.75, 0.5, 1.0]), 4), 3 * torch.tensor([0.75, 0.5, 1.0]).log()
    )
    assert bond_log_ratio_reward(torch.tensor([0.0, 0.5]), 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="reference_rewards"):
        empirical_quantile(reward, per_prompt[:2])


def test_jbond_reward_penalises_losing_to_both_anchor_samples():
    policy = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.5])
    anchors = torch.tensor([[2.0, 3.0], [1.0, 3.0], [1.0, 2.0], [2.0, 2.0], [2.0, 1.5]])
    # loses to both; beats one; beats both; ties both; loses to one and ties the other
    assert jbond_reward(policy, anchors).tolist() == pytest.approx([-math.log(16), 0.0, 0.0, 0.0, 0.0])
    assert jbond_reward(policy, anchors, penalty=1.0).tolist() == [-1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="anchor_rewards"):
        jbond_reward(policy, anchors[:, :1])


def test_jeffreys_loss_mixes_nll_and_policy_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    forward = torch.randn(6, 3, generator=g, dtype=torch.float64)
    policy_lp = torch.randn(6, generator=g, dtype=torch.float64)
    rewards = torch.randn(6, generator=g, dtype=torch.float64)
    nll = -forward.sum(-1).mean()
    pg = policy_gradient_loss(policy_lp, rewards, "rloo", 3)
    torch.testing.assert_close(jeffreys_loss(forward, policy_lp, rewards, 0.0, "rloo", 3), nll)
    torch.testing.assert_close(jeffreys_loss(forward, policy_lp, rewards, 1.0, "rloo", 3), pg)
    torch.testing.assert_close(
        jeffreys_loss(forward, policy_lp, rewards, 0.3, "rloo", 3), 0.7 * nll + 0.3 * pg
    )
    with pytest.raises(ValueError, match="beta must be in"):
        jeffreys_loss(forward, policy_lp, rewards, 1.5)


# ----------------------------------------------------------------------------- policy gradient


def test_policy_gradient_loss_rloo_baseline_by_hand():
    logprobs = torch.tensor([-1.0, -2.0, -0.5, -1.5, -0.2, -3.0], requires_grad=True)
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 2.0], requires_grad=True)
    # leave-one-out means: (2+3)/2, (1+3)/2, (1+2)/2 | (0+2)/2, (10+2)/2, (10+0)/2
    adv = torch.tensor([-1.5, 0.0, 1.5, 9.0, -6.0, -3.0])
    loss = policy_gradient_loss(logprobs, rewards, "rloo", group=3)
    torch.testing.assert_close(loss, -(adv * logprobs).mean())
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv / 6)
    assert rewards.grad is None  # rewards are constants
    mean_adv = rewards.detach() - rewards.detach().mean()
    torch.testing.assert_close(policy_gradient_loss(logprobs, rewards, "mean"), -(mean_adv * logprobs).mean())
    torch.testing.assert_close(policy_gradient_loss(logprobs, rewards, "none"), -(rewards * logprobs).mean())
    per_token = torch.stack([logprobs, logprobs], -1)  # (B, 2) per-token log-probs are summed
    torch.testing.assert_close(
        policy_gradient_loss(per_token, rewards, "none"), -(2 * rewards * logprobs).mean()
    )
    with pytest.raises(ValueError, match="group must be an int >= 1 dividing the batch"):
        policy_gradient_loss(logprobs, rewards, "rloo", group=4)
    with pytest.raises(ValueError, match="rloo' needs group >= 2"):
        policy_gradient_loss(logprobs, rewards, "rloo", group=1)
    with pytest.raises(ValueError, match="baseline must be one of"):
        policy_gradient_loss(logprobs, rewards, "median")


def lm(seed: int, cfg: LMConfig = CFG) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(cfg)


def test_kl_to_anchor_is_kl_of_policy_to_anchor(seed):
    policy, anchor = lm(seed).double(), lm(seed + 1).double()
    seqs = torch.randint(0, CFG.vocab, (5, 7), generator=torch.Generator().manual_seed(seed))
    got = kl_to_anchor(policy, anchor, seqs, prompt_len=3)
    with torch.no_grad():
        lp = policy.completion_logits(seqs, 3).log_softmax(-1)
        la = anchor.completion_logits(seqs, 3).log_softmax(-1)
    want = (lp.exp() * (lp - la)).sum(-1).sum(-1)  # KL(π ‖ π_anchor) summed over the 4 positions
    assert got.shape == (5,)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, (la.exp() * (la - lp)).sum(-1).sum(-1))  # not KL(π_anchor ‖ π)
    got.sum().backward()  # the policy gets the gradient
    assert policy.lm_head.weight.grad.abs().sum() > 0
    same = kl_to_anchor(policy, copy.deepcopy(policy), seqs, 3)
    torch.testing.assert_close(same, torch.zeros(5, dtype=torch.float64))


def test_rl_step_raises_the_reward_of_a_bandit():
    """Prompts of 2 tokens, one completion token; reward 1 for token 3 (about 1/8 at the start)."""
    policy = lm(0, LMConfig(vocab=8, width=16, depth=1, heads=2, context=4))
    anchor = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(0)

    def reward_fn(prompts, completions):
        return (completions[:, 0] == 3).double()

    def success() -> float:
        x = torch.randint(0, 8, (512, 2), generator=g)
        return float(reward_fn(x, policy.sample(x, 1, generator=g)[:, 2:]).mean())

    before = success()
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    metrics = [
        rl_step(
            policy,
            anchor,
            opt,
            torch.randint(0, 8, (16, 2), generator=g),
            reward_fn,
            length=1,
            beta=0.01,
            generator=g,
        )
        for _ in range(30)
    ]
    after = success()
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the anchor
    assert metrics[-1]["kl"] > 0
    assert set(metrics[0]) == {"reward", "kl", "shaped_reward", "loss"}
    assert before < 0.3 and after > before + 0.4, (before, after)


def test_rl_step_kl_penalty_pulls_the_policy_to_the_anchor():
    """With a constant reward only the −β KL term remains: the KL to the anchor falls."""
    cfg = LMConfig(vocab=8, width=16, depth=1, heads=2, context=4)
    policy, anchor = lm(1, cfg), lm(2, cfg)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)

    def zero(prompts, completions):
        return torch.zeros(prompts.shape[0])

    metrics = [
        rl_step(
            policy,
            anchor,
            opt,
            torch.randint(0, 8, (16, 2), generator=g),
            zero,
            length=2,
            beta=1.0,
            generator=g,
        )
        for _ in range(30)
    ]
    first, last = (sum(m["kl"] for m in ms) / 5 for ms in (metrics[:5], metrics[-5:]))
    assert last < 0.5 * first, (first, last)


def test_rl_step_bad_inputs():
    policy = lm(0)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    prompts = torch.zeros(2, 2, dtype=torch.long)

    def ones(x, y):
        return torch.ones(x.shape[0])

    with pytest.raises(ValueError, match="beta must be >= 0"):
        rl_step(policy, policy, opt, prompts, ones, length=1, beta=-0.1)
    with pytest.raises(ValueError, match="group must be an int >= 1"):
        rl_step(policy, policy, opt, prompts, ones, length=1, beta=0.1, group=0)
    with pytest.raises(ValueError, match=r"reward_fn must return shape \(8,\)"):
        rl_step(policy, policy, opt, prompts, lambda x, y: torch.ones(2), length=1, beta=0.1)


# ----------------------------------------------------------------------------- reward models


def preference_pairs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sequences of 6 tokens from 4; the true reward is the count of token 1 (ties dropped)."""
    a, b = torch.randint(0, 4, (n, 6), generator=g), torch.randint(0, 4, (n, 6), generator=g)
    ra, rb = (a == 1).sum(1), (b == 1).sum(1)
    keep, a_wins = ra != rb, (ra > rb)[:, None]
    return torch.where(a_wins, a, b)[keep], torch.where(a_wins, b, a)[keep]


def test_bradley_terry_training_learns_the_preferences():
    cfg = LMConfig(vocab=4, width=16, depth=1, heads=2, context=8)
    rm = RewardModel.from_lm(lm(1, cfg))
    g = torch.Generator().manual_seed(2)
    test_chosen, test_rejected = preference_pairs(512, g)
    opt = torch.optim.Adam(rm.parameters(), lr=1e-2)
    for _ in range(30):
        chosen, rejected = preference_pairs(64, g)
        loss = bradley_terry_loss(rm(chosen), rm(rejected))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((rm(test_chosen) > rm(test_rejected)).double().mean())
    assert accuracy > 0.8


def test_reward_losses_by_hand():
    torch.testing.assert_close(
        bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])),
        torch.tensor((math.log1p(math.exp(-2)) + math.log(2)) / 2),
    )
    assert float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1000.0]))) == pytest.approx(
        1000.0
    )  # no inf
    torch.testing.assert_close(
        regression_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])), torch.tensor(2.5)
    )
    with pytest.raises(ValueError, match="r_chosen"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_from_lm_warm_and_ensemble(seed):
    base = lm(seed).double()
    rm = RewardModel.from_lm(base)
    seqs = torch.randint(0, CFG.vocab, (4, 6), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(rm.backbone(seqs), base(seqs))  # the LM's weights
    torch.testing.assert_close(rm(seqs), torch.zeros(4, dtype=torch.float64))  # a zero head
    models = []
    for i in range(3):  # fine-tuned differently from the shared initialisation
        m = copy.deepcopy(rm)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        models.append(m)
    same = warm([models[0]] * 3)
    torch.testing.assert_close(same(seqs), models[0](seqs))
    merged = warm(models)
    torch.testing.assert_close(merged.head.weight, sum(m.head.weight for m in models) / 3)
    prompts, completions = seqs[:, :2], seqs[:, 2:]
    predictions = torch.stack([m(seqs) for m in models])
    torch.testing.assert_close(ensemble(models)(prompts, completions), predictions.mean(0))
    torch.testing.assert_close(ensemble([models[1]] * 2)(prompts, completions), predictions[1])
    assert not torch.allclose(merged(seqs), predictions.mean(0))  # weight averaging is not ensembling


@pytest.mark.parametrize(
    ("rewards", "match"),
    [
        (torch.zeros(4, 1), r"reward_fn must return shape \(4,\), got \(4, 1\)"),
        (torch.zeros(3), r"shape \(4,\)"),
        (torch.zeros(4, dtype=torch.long), r"floating tensor, got torch.int64"),
        (torch.tensor([0.0, math.nan, 1.0, 2.0]), r"NaN at indices \[1\]"),
        (torch.tensor([0.0, 1.0, -math.inf, 2.0]), r"inf at indices \[2\]"),
        ([0.0, 1.0, 2.0, 3.0], r"must return a torch.Tensor, got list"),
    ],
    ids=["2d", "length", "int", "nan", "inf", "list"],
)
def test_check_rewards_bad(rewards, match):
    with pytest.raises(ValueError, match=match):
        check_rewards(rewards, 4)


def test_check_rewards_good():
    r = torch.tensor([0.0, 1.0, -2.0])
    assert check_rewards(r, 3) is r
    with pytest.raises(ValueError, match="my_scorer"):
        check_rewards(torch.zeros(2), 3, name="my_scorer")


# ----------------------------------------------------------------------------- inverse RL


def test_td_regularised_mle_with_lambda_zero_is_cross_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    actions = torch.randint(0, 7, (3, 5), generator=g)
    want = F.cross_entropy(logits.reshape(-1, 7), actions.reshape(-1))
    torch.testing.assert_close(td_regularised_mle_loss(logits, actions, lam=0.0), want)
    mask = torch.rand(3, 5, generator=g) > 0.3
    padded = actions.masked_fill(~mask, -100)
    want = F.cross_entropy(logits.reshape(-1, 7), padded.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(td_regularised_mle_loss(logits, padded, lam=0.0, mask=mask), want)


def test_td_term_by_hand():
    q = [[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, -1.0]]
    actions, lam, gamma = [3, 0, 1], 0.5, 0.9
    v = [math.log(sum(math.exp(x) for x in row)) for row in q]
    residual = [q[0][3] - gamma * v[1], q[1][0] - gamma * v[2], q[2][1] - 0.0]  # v(s_3) = 0: terminal
    logp = [q[t][a] - v[t] for t, a in enumerate(actions)]
    want = sum(lam * r**2 - lp for r, lp in zip(residual, logp, strict=True)) / 3
    logits, acts = torch.tensor([q], dtype=torch.float64), torch.tensor([actions])
    assert float(td_regularised_mle_loss(logits, acts, lam, gamma)) == pytest.approx(want, rel=1e-12)
    assert extracted_rewards(logits, acts, gamma)[0].tolist() == pytest.approx(residual, rel=1e-12)
    # γ = 0: the residual is Q(s_t, a_t) itself
    assert extracted_rewards(logits, acts, 0.0)[0].tolist() == pytest.approx([3.0, 1.0, 2.0])


def test_td_mask_ends_the_sequence(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    got = td_regularised_mle_loss(logits, actions.masked_fill(~mask, -100), lam=0.7, gamma=0.8, mask=mask)
    # the first row is the sequence of its 2 valid positions; the loss averages over 6 positions
    short = td_regularised_mle_loss(logits[:1, :2], actions[:1, :2], lam=0.7, gamma=0.8)
    full = td_regularised_mle_loss(logits[1:], actions[1:], lam=0.7, gamma=0.8)
    torch.testing.assert_close(got, (2 * short + 4 * full) / 6)
    got.backward()
    assert logits.grad[0, 2:].abs().max() == 0  # masked positions get no gradient
    rewards = extracted_rewards(logits, actions, 0.8, mask)
    assert rewards[0, 2:].abs().max() == 0
    torch.testing.assert_close(rewards[0, :2], extracted_rewards(logits[:1, :2], actions[:1, :2], 0.8)[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -1.0}, "lam must be >= 0"),
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
        ({"actions": torch.zeros(1, 2, dtype=torch.long)}, r"actions must be an integer \(B, L\)"),
        ({"actions": torch.full((1, 3), 9)}, r"actions must be token ids in \[0, 4\)"),
        ({"mask": torch.ones(1, 3)}, "mask must be a bool"),
    ],
    ids=["lam", "gamma", "actions-shape", "actions-range", "mask-dtype"],
)
def test_td_bad_inputs(kwargs, match):
    args = {
        "logits": torch.zeros(1, 3, 4),
        "actions": torch.zeros(1, 3, dtype=torch.long),
        "lam": 1.0,
    } | kwargs
    with pytest.raises(ValueError, match=match):
        td_regularised_mle_loss(**args)
