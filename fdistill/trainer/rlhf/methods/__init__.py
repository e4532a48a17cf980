"""The RLHF experiment's methods, one module each, all with the same five functions: ``check(cfg)``
(its settings; ValueError), ``batches(cfg)`` (the batch sizes that split over ranks), ``run(ctx)``
(trains on the shared :class:`~fdistill.trainer.rlhf.stages.Context`; returns its curves),
``summary(curves)`` (the Markdown table) and ``plot(curves, out)`` (its PNGs)."""

from . import bond, irl, rl, warm, warp

REGISTRY = {"rl": rl, "warp": warp, "bond": bond, "warm": warm, "irl": irl}

__all__ = ["REGISTRY"]
