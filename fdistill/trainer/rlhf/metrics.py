"""Reward models judged against the true reward on preference pairs: the labels' agreement with it,
a scorer's pairwise accuracy, and how much of the label noise a scorer memorised."""

from __future__ import annotations

import torch


def label_agreement(prefs: dict) -> dict:
    """How often the noisy training label agrees with the true ordering (ties excluded)."""
    strict = prefs["r_chosen"] != prefs["r_rejected"]
    right = (prefs["r_chosen"] > prefs["r_rejected"])[strict]
    return {
        "agreement": float(right.float().mean()) if strict.any() else float("nan"),
        "ties": float((~strict).float().mean()),
    }


@torch.no_grad()
def accuracy(score, prefs: dict) -> dict:
    """Fraction of pairs (true ties excluded) that ``score`` orders as the true reward does."""
    strict = prefs["r_chosen"] != prefs["r_rejected"]
    truth = prefs["r_chosen"] > prefs["r_rejected"]
    pred = score(prefs["chosen"]) > score(prefs["rejected"])
    return {"accuracy": float((pred == truth)[strict].float().mean()), "pairs": int(strict.sum())}


@torch.no_grad()
def wrong_label_fit(score, prefs: dict) -> float:
    """Among the training pairs whose label contradicts the true reward, the fraction ``score``
    agrees with (the wrong label): memorisation of label noise."""
    wrong = prefs["r_chosen"] < prefs["r_rejected"]
    if not wrong.any():
        return float("nan")
    pred = score(prefs["chosen"][wrong]) > score(prefs["rejected"][wrong])
    return float(pred.float().mean())
