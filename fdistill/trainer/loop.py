"""What the experiments share: a resumable training loop with progress bars and checkpoints, and the
run directory's bookkeeping (a config claim, JSON-able configs, file-name slugs)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint


class Progress:
    """tqdm progress bar when available, else a silent stand-in; off when stderr is not a terminal."""

    def __init__(self, total, desc, enabled=True):
        try:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=desc, file=sys.stderr, disable=None if enabled else True, leave=False
            )  # None: off when not a TTY
        except ImportError:
            self.bar = None

    def update(self, n=1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()})

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_loop(
    name: str,
    ckpt: Path,
    steps: int,
    step_fn: Callable[[], dict],
    *,
    models: dict,
    optimizers: dict,
    generators: dict,
    data=None,
    evaluate: Callable[[], dict] | None = None,
    eval_every: int = 0,
    ckpt_every: int = 0,
    progress: bool = True,
    log=None,
) -> dict:
    """Run ``step_fn`` (one update; returns its metrics) ``steps`` times, resuming from ``ckpt``.

    The checkpoint holds ``models``, ``optimizers``, ``generators``, ``data.state()`` (when ``data`` is
    given) and the record, so a resumed run continues bit for bit. ``evaluate()`` runs at step 0, every
    ``eval_every`` steps and at the end. Returns the record
    ``{"train": [metrics per step], "eval": [{"step", ...}], "done": bool}``.

    Under ``torchrun`` every rank runs the loop in lockstep (``step_fn`` and ``evaluate`` do the
    collectives) and reads the checkpoint; rank 0 alone writes it and shows the progress bar."""
    record = {"train": [], "eval": [], "done": False}
    if ckpt.exists():
        record = load_checkpoint(ckpt, models=models, optimizers=optimizers, generators=generators)
        if data is not None:
            data.load_state(record.pop("data_state"))
        if len(record["train"]) >= steps:
            return record
        if log:
            log(f"  resuming {name} at step {len(record['train'])}")
    start = len(record["train"])
    if evaluate is not None and start == 0:
        record["eval"].append({"step": 0, **evaluate()})

    def save(done: bool) -> None:
        meta = dict(record, done=done)
        if data is not None:
            meta["data_state"] = data.state()
        if distributed.is_main():
            save_checkpoint(ckpt, models=models, optimizers=optimizers, generators=generators, meta=meta)
        distributed.barrier()  # nobody reads the file before it is complete

    bar = Progress(steps, name, progress and distributed.is_main())
    bar.update(start)
    for step in range(start + 1, steps + 1):
        record["train"].append(step_fn())
        if evaluate is not None and (step % eval_every == 0 or step == steps):
            record["eval"].append({"step": step, **evaluate()})
            bar.update(1, **{k: v for k, v in record["eval"][-1].items() if k != "step"})
        else:
            bar.update(1)
        if ckpt_every and step % ckpt_every == 0 and step < steps:
            save(False)
    bar.close()
    record["done"] = True
    save(True)
    return record


def claim_out_dir(out: Path, run_config: dict, what: str) -> None:
    """Refuse to resume into a directory that holds another configuration's run (``what`` names the
    configuration's parts in the message). Under ``torchrun`` every rank checks (the same error on all of
    them) and rank 0 writes the marker."""
    marker = out / "run.json"
    distributed.barrier()  # e.g. after rank 0's --fresh deletion
    found = marker.exists()
    if found and json.loads(marker.read_text()) != json.loads(json.dumps(run_config)):
        raise ValueError(
            f"{out} holds a run with another configuration ({what}); pass another --out, or --fresh "
            "to delete it"
        )
    distributed.barrier()  # every rank has read the marker before rank 0 writes it
    if not found and distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(run_config, indent=1))
    distributed.barrier()


def jsonable(x):
    """Dataclasses, tuples and dicts as plain JSON values; non-finite floats as strings."""
    if hasattr(x, "__dataclass_fields__"):
        return {k: jsonable(v) for k, v in asdict(x).items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)


def slug(name: str) -> str:
    """A file-name-safe form of a run's name."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")
