"""What the experiments' training shares: a resumable loop with progress bars and checkpoints,
checkpoint writes under ``torchrun``, and the random oracle both experiments start from (the run
directory's bookkeeping is :mod:`.rundir`, the outputs :mod:`.report`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .model import LMConfig, TinyLM
from .rundir import checkpoint_path

SEED_STRIDE = 1_000_000  # run seed s draws its random streams from s · this + an offset below it
HELDOUT_SEED = 10_000  # the held-out prompts' generator is seeded run seed + this: a stream of its own
ORACLE_POOL = 512  # fresh oracle samples drawn at a time (batched sampling is cheaper per sequence)


class Progress:
    """A tqdm progress bar, off when stderr is not a terminal; with ``enabled=False`` a silent stand-in
    that needs no tqdm (the runs check for it up front: :func:`~.extras.require_for_run`)."""

    def __init__(self, total, desc, enabled=True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            # disable=None: off when stderr is not a terminal
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False)

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


def save_on_main(path: Path, **kwargs) -> None:
    """Rank 0 writes the checkpoint (:func:`~.checkpoint.save_checkpoint`'s arguments), after every rank
    has looked for it and before any reads it."""
    distributed.barrier()
    if distributed.is_main():
        save_checkpoint(path, **kwargs)
    distributed.barrier()


def oracle_stage(config: LMConfig, out: Path, seed: int, name: str = "oracle") -> TinyLM:
    """The oracle: a random TinyLM drawn from ``seed``, saved (as the checkpoint ``name``) by a run's
    first start and restored by every rerun (so a resumed run never depends on the initialisation
    code), frozen."""
    torch.manual_seed(seed)
    oracle = TinyLM(config)
    path = checkpoint_path(out, name)
    if path.exists():
        load_checkpoint(path, models={"oracle": oracle})
    else:
        save_on_main(path, models={"oracle": oracle}, meta={"stage": "oracle"})
    oracle.eval()
    for p in oracle.parameters():
        p.requires_grad_(False)
    return oracle
