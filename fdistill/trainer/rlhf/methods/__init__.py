"""The RLHF experiment's methods, one module each, all with the same six functions: ``check(cfg)``
(its settings; ValueError), ``batches(cfg)`` (the batch sizes that split over ranks), ``run(ctx)``
(trains one seed on the shared :class:`~fdistill.trainer.rlhf.stages.Context`; returns its curves),
``aggregate(per_seed)`` (the seeds' curves as bands over the seeds), ``summary(curves)`` (the Markdown
table of the aggregated curves) and ``plot(curves, out)`` (its PNGs)."""

from . import bond, irl, rl, warm, warp

REGISTRY = {"rl": rl, "warp": warp, "bond": bond, "warm": warm, "irl": irl}

__all__ = ["REGISTRY"]
