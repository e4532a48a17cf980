"""The run directory: ``--out`` checked before anything is written, the ``run.json`` claim that keeps
two configurations out of one directory, and the names of what a run writes there."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from . import distributed
from .files import write_atomic

RUN_JSON = "run.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_SUFFIX = ".safetensors"


class OutDirError(ValueError):
    """An output directory that cannot hold a run, or whose ``run.json`` is damaged."""


def checkpoint_path(out: Path, name: str) -> Path:
    """Where the stage ``name`` of the run in ``out`` keeps its checkpoint."""
    return Path(out) / CHECKPOINTS / f"{name}{CHECKPOINT_SUFFIX}"


def check_out_dir(out: str | Path) -> None:
    """Raise :class:`OutDirError` naming ``out`` when it cannot hold a run: it is a file, it lies below
    a file, or the directory it is (or would be created in) is not writable. Writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"output directory {out} is a file; pass another --out")
    existing = out
    while not existing.exists():  # the nearest ancestor that exists: where mkdir would start
        existing = existing.parent
    if not existing.is_dir():
        raise OutDirError(f"output directory {out} is below {existing}, which is a file; pass another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutDirError(f"output directory {out}: {existing} is not writable; pass another --out")


def claim_out_dir(out: Path, run_config: dict, what: str) -> None:
    """Refuse to resume into a directory that holds another configuration's run (``what`` names the
    configuration's parts in the message), or whose ``run.json`` is damaged. Under ``torchrun`` every
    rank checks (the same error on all of them) and rank 0 writes the marker."""
    check_out_dir(out)
    marker = out / RUN_JSON
    distributed.barrier()  # e.g. after rank 0's --fresh deletion
    found = marker.exists()
    if found:
        try:
            claimed = json.loads(marker.read_text())
        except (OSError, ValueError) as exc:  # ValueError: truncated JSON or not UTF-8
            raise OutDirError(
                f"{marker} is unreadable or not valid JSON ({exc}); restore it, or pass --fresh to delete "
                f"{out} and start over"
            ) from exc
        if claimed != json.loads(json.dumps(run_config)):
            raise OutDirError(
                f"{out} holds a run with another configuration ({what}); pass another --out, or --fresh "
                "to delete it"
            )
    distributed.barrier()  # every rank has read the marker before rank 0 writes it
    if not found and distributed.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, json.dumps(run_config, indent=1))
        except OSError as exc:  # e.g. a read-only file system, which os.access does not always see
            raise OutDirError(f"cannot write the output directory {out}: {exc}; pass another --out") from exc
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
