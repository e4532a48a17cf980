"""Checkpoints in safetensors: models, optimizers, random generators and JSON metadata, written
atomically (a temporary file, then ``os.replace``), so an interruption never leaves a half file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not fit the models it is loaded into."""


def save_checkpoint(path, *, models=None, optimizers=None, generators=None, meta=None) -> None:
    """Write ``{name: module}``, ``{name: optimizer}``, ``{name: torch.Generator}`` and a JSON-able
    ``meta`` dict to ``path``."""
    from safetensors.torch import save_file

    tensors, optim_groups = {}, {}
    for name, model in (models or {}).items():
        for key, value in model.state_dict().items():
            tensors[f"model/{name}/{key}"] = value.detach().contiguous().clone()
    for name, opt in (optimizers or {}).items():
        state = opt.state_dict()
        optim_groups[name] = state["param_groups"]
        for pid, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"optim/{name}/{pid}/{key}"] = torch.as_tensor(value).detach().contiguous().clone()
    for name, gen in (generators or {}).items():
        tensors[f"rng/{name}"] = gen.get_state()
    header = {"meta": meta or {}, "optim_groups": optim_groups}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"fdistill": json.dumps(header)})
    os.replace(tmp, path)


def load_checkpoint(path, *, models=None, optimizers=None, generators=None) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns ``meta``.

    Raises :class:`CheckpointError` naming the file when it is missing, unreadable, or does not
    match the objects (other keys or shapes)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["fdistill"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({exc}); delete it to redo that stage"
        ) from exc
    try:
        for name, model in (models or {}).items():
            prefix = f"model/{name}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            _load_module(model, state)
        for name, opt in (optimizers or {}).items():
            prefix = f"optim/{name}/"
            state: dict = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    pid, entry = key[len(prefix) :].split("/", 1)
                    state.setdefault(int(pid), {})[entry] = value
            opt.load_state_dict({"state": state, "param_groups": header["optim_groups"][name]})
        for name, gen in (generators or {}).items():
            gen.set_state(tensors[f"rng/{name}"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match the models being restored: {exc}") from exc
    return header["meta"]


def _load_module(model: nn.Module, state: dict) -> None:
    if not state:
        raise KeyError("no tensors for this model")
    model.load_state_dict(state, strict=True)
