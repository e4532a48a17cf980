"""The trainer's optional dependencies (the ``trainer`` extra in pyproject.toml), checked before an
experiment writes anything, so that a missing one is one clear message rather than a traceback after
minutes of training."""

from __future__ import annotations

import importlib

EXTRA = "trainer"

# what each module is for, and how to do without it where one can
_NEEDED_FOR = {
    "safetensors": "checkpoints",
    "tqdm": "progress bars; or pass --no-progress",
    "matplotlib": "plots; or pass --no-plots",
}


class MissingExtraError(ImportError):
    """A module of the trainer extra is not installed."""


def require(*modules: str, who: str = "the trainer", uses: dict[str, str] | None = None) -> None:
    """Raise :class:`MissingExtraError` naming every missing module and the pip extra that provides it.
    ``who`` needs them, for ``uses[module]`` (default: the trainer's uses)."""
    missing = [m for m in modules if not _importable(m)]
    if missing:
        uses = {**_NEEDED_FOR, **(uses or {})}
        what = ", ".join(f"{m} ({uses[m]})" for m in missing)
        raise MissingExtraError(f"{who} needs {what}: pip install 'fdistill[{EXTRA}]'")


def require_for_run(*, progress: bool, plots: bool) -> None:
    """The modules an experiment run uses: always safetensors, tqdm for progress bars, matplotlib for
    plots."""
    require("safetensors", *(["tqdm"] if progress else []), *(["matplotlib"] if plots else []))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
