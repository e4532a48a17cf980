"""Building blocks of RLHF-style training on the trainer's TinyLM: weight merging (WARM, WARP),
reward models, KL-regularised REINFORCE, BOND / J-BOND and inverse RL as TD-regularised MLE."""

from .bond import best_of_n, bond_log_ratio_reward, empirical_quantile, jbond_reward, jeffreys_loss
from .irl import extracted_rewards, td_regularised_mle_loss
from .merge import average, ema_update, liti, slerp
from .reward import (
    RewardFn,
    RewardModel,
    bradley_terry_loss,
    check_rewards,
    ensemble,
    regression_loss,
    warm,
)
from .rl import BASELINES, advantages, kl_to_anchor, policy_gradient_loss, rl_step, token_kl

__all__ = [
    "BASELINES",
    "RewardFn",
    "RewardModel",
    "advantages",
    "average",
    "best_of_n",
    "bond_log_ratio_reward",
    "bradley_terry_loss",
    "check_rewards",
    "ema_update",
    "empirical_quantile",
    "ensemble",
    "extracted_rewards",
    "jbond_reward",
    "jeffreys_loss",
    "kl_to_anchor",
    "liti",
    "policy_gradient_loss",
    "regression_loss",
    "rl_step",
    "slerp",
    "td_regularised_mle_loss",
    "token_kl",
    "warm",
]
