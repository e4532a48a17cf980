"""Reward models and reward functions.

A :class:`RewardModel` is a TinyLM backbone with a linear head on the hidden state of the last token:
``r(x, y) = w · h_T(x, y) + b``. Sequences here have no padding and the attention is causal, so the last
position is the only one that has seen the whole prompt and completion.

* Bradley–Terry: ``P(y_c ≻ y_r) = σ(r_c − r_r)``, loss ``−log σ(r_c − r_r)`` averaged over pairs.
* Regression: ``mean (r − label)²``.
* WARM: ``φ = (1/M) Σ_i φ_i`` over reward models fine-tuned from one shared initialisation
  (:func:`warm`), against prediction ensembling ``r = (1/M) Σ_i r_i`` (:func:`ensemble`).

A reward function (:data:`RewardFn`) maps ``(prompts (B, P), completions (B, L))`` to a float tensor of
shape ``(B,)``; :func:`check_rewards` checks its output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..model import LMConfig, TinyLM
from . import merge

RewardFn = Callable[[Tensor, Tensor], Tensor]


class RewardModel(nn.Module):
    """``forward(seq) -> (B,)``: a linear head on ``TinyLM.hidden(seq)[:, -1]``.

    The head starts at zero, so every reward model built by :meth:`from_lm` from one LM starts from
    exactly the same weights (WARM's shared initialisation) and predicts 0. The backbone's own LM head
    is kept (its weights stay in the state dict) but unused.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = TinyLM(cfg)
        self.head = nn.Linear(cfg.width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, seq: Tensor) -> Tensor:
        return self.head(self.backbone.hidden(seq)[:, -1]).squeeze(-1)

    @classmethod
    def from_lm(cls, lm: TinyLM) -> RewardModel:
        """A reward model whose backbone is a copy of ``lm`` (same config, weights and dtype)."""
        dtype = next(lm.parameters()).dtype
        rm = cls(lm.cfg).to(device=next(lm.parameters()).device, dtype=dtype)
        rm.backbone.load_state_dict(lm.state_dict())
        return rm


def _check_same_shape(names: tuple[str, str], a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same shape"
        )


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """``mean −log σ(r_chosen − r_rejected)`` (computed as ``−logsigmoid``, stable for large margins)."""
    _check_same_shape(("r_chosen", "r_rejected"), r_chosen, r_rejected)
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def regression_loss(r: Tensor, labels: Tensor) -> Tensor:
    """``mean (r − labels)²``."""
    _check_same_shape(("r", "labels"), r, labels)
    return F.mse_loss(r, labels.to(r.dtype))


def check_rewards(rewards: Tensor, batch: int, name: str = "reward_fn") -> Tensor:
    """``rewards`` if it is a finite floating tensor of shape ``(batch,)``; ValueError otherwise."""
    if not isinstance(rewards, Tensor):
        raise ValueError(f"{name} must return a torch.Tensor, got {type(rewards).__name__}")
    if rewards.shape != (batch,):
        raise ValueError(f"{name} must return shape ({batch},), got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"{name} must return a floating tensor, got {rewards.dtype}")
    for what, bad in (("NaN", rewards.isnan()), ("inf", rewards.isinf())):
        if bad.any():
            raise ValueError(f"{name} returned {what} at indices {bad.nonzero().flatten().tolist()}")
    return rewards


def ensemble(reward_models: Sequence[nn.Module]) -> RewardFn:
    """A reward function averaging the models' predictions on ``cat(prompts, completions)``; no grad."""
    models = list(reward_models)
    if not models:
        raise ValueError("reward_models is empty")

    @torch.no_grad()
    def reward_fn(prompts: Tensor, completions: Tensor) -> Tensor:
        seq = torch.cat([prompts, completions], 1)
        return torch.stack([m(seq) for m in models]).mean(0)

    return reward_fn


def warm(reward_models: Sequence[RewardModel], weights: Sequence[float] | None = None) -> RewardModel:
    """A reward model with the weight average (:func:`merge.average`) of ``reward_models``."""
    models = list(reward_models)
    if not models:
        raise ValueError("reward_models is empty")
    cfgs = {m.cfg for m in models}
    if len(cfgs) > 1:
        raise ValueError(f"reward_models have different configs: {sorted(map(str, cfgs))}")
    first = next(models[0].parameters())
    merged = RewardModel(models[0].cfg).to(device=first.device, dtype=first.dtype)
    merged.load_state_dict(merge.average([m.state_dict() for m in models], weights))
    return merged
