"""The RLHF methods' aggregates over seeds: each seed's numbers turned into
:func:`~fdistill.trainer.report.seed_band` s (mean, std, min, max), the entries that do not depend on the
seed (steps, β, names) checked equal and kept as they are."""

from __future__ import annotations

from ..report import scalar_band, seed_band


def same(values, what: str):
    """The one value every seed gave for ``what`` (ValueError if they differ)."""
    values = list(values)
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"the seeds differ in {what}: {values!r}")
    return values[0]


def band_dict(runs, series=(), scalars=(), fixed=()) -> dict:
    """Across the seeds' dicts ``runs``: a :func:`seed_band` of each key of ``series`` (lists), a
    :func:`scalar_band` of each of ``scalars`` (numbers), and each of ``fixed`` as the seeds' one value."""
    runs = list(runs)
    out = {k: same((r[k] for r in runs), k) for k in fixed}
    out |= {k: seed_band(r[k] for r in runs) for k in series}
    return out | {k: scalar_band([r[k] for r in runs]) for k in scalars}


def curve_bands(runs, keys) -> dict:
    """Runs evaluated along training (``steps`` and the ``keys`` series), one per seed: the steps and a
    band per key."""
    return band_dict(runs, series=keys, fixed=("steps",))


def named(per_seed: list[dict], key: str, make) -> dict:
    """``{name: make([seed's entry ...])}`` over the names of the seeds' ``key`` dicts (the same names)."""
    names = same((list(c[key]) for c in per_seed), f"the names of {key!r}")
    return {name: make([c[key][name] for c in per_seed]) for name in names}


def means(c: dict, *keys: str) -> dict:
    """The mean curves of an aggregated run: ``{key: band["mean"]}`` (and its steps)."""
    out = {"steps": c["steps"]} if "steps" in c else {}
    return out | {k: c[k]["mean"] for k in keys}


def seeds_line(curves: dict) -> str:
    """The summaries' first line with several seeds: which, and how the cells read."""
    seeds = curves["seeds"]
    if len(seeds) == 1:
        return ""
    return f"Seeds {', '.join(str(s) for s in seeds)}: mean (min–max over the seeds).\n\n"
