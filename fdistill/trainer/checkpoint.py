"""Checkpoints in safetensors: models, optimizers, random generators and JSON metadata in one file,
written atomically (:func:`~.files.write_atomic`) and self-verifying.

Every file carries the sha256 of its own bytes in its safetensors metadata (under ``fdistill_sha256``,
hashed with that value's 64 characters set to ``0``), so the digest covers the tensors, their header
and the JSON metadata, and is written in the same atomic step as they are: a changed byte anywhere,
e.g. a flipped bit in a weight or an edited number in the metadata, fails the load with a
:class:`CheckpointError` instead of silently changing (or NaN-ing) the curves of a resumed run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .files import write_atomic

DIGEST_KEY = "fdistill_sha256"
_PLACEHOLDER = b"0" * 64  # the digest's slot while hashing: a sha256 in hex is 64 characters
_DIGEST_FIELD = f'"{DIGEST_KEY}":"'.encode()  # as safetensors writes it (compact JSON)
_RECOVER = "delete the file to recompute its stage on the next run, or rerun with --fresh to start over"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not fit the models it is loaded into."""


def save_checkpoint(path, *, models=None, optimizers=None, generators=None, meta=None) -> None:
    """Write ``{name: module}``, ``{name: optimizer}``, ``{name: torch.Generator}`` and a JSON-able
    ``meta`` dict to ``path``, with its checksum."""
    from safetensors.torch import save

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
    metadata = {"fdistill": json.dumps(header), DIGEST_KEY: _PLACEHOLDER.decode()}
    data = bytearray(save(tensors, metadata=metadata))
    slot = _digest_slot(data)
    data[slot] = hashlib.sha256(data).hexdigest().encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, bytes(data))


def load_checkpoint(path, *, models=None, optimizers=None, generators=None) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns ``meta``.

    Raises :class:`CheckpointError` naming the file and how to recover when it is missing,
    unreadable, fails its checksum, or does not match the objects (other keys or shapes)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    header, tensors = _read_verified(path)
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


def _read_verified(path: Path) -> tuple[dict, dict]:
    """The checkpoint's fdistill header and tensors, after its checksum has been verified."""
    from safetensors.torch import load

    try:
        data = bytearray(path.read_bytes())
        size = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header, tensor bytes
        metadata = json.loads(data[8 : 8 + size])["__metadata__"]
        stored = metadata.get(DIGEST_KEY)
        if stored is None:
            raise CheckpointError(
                f"checkpoint {path} carries no checksum (an older fdistill wrote it); {_RECOVER}"
            )
        slot = _digest_slot(data)
        if data[slot] != stored.encode():
            raise ValueError("the checksum field is damaged")
        data[slot] = _PLACEHOLDER
        if hashlib.sha256(data).hexdigest() != stored:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its bytes do not match the sha256 checksum stored in it "
                f"(a changed byte in its tensors or metadata); {_RECOVER}"
            )
        data[slot] = stored.encode()
        tensors = load(bytes(data))
        header = json.loads(metadata["fdistill"])
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged header: json, safetensors and bytes raise several types
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({exc}); {_RECOVER}") from exc
    return header, tensors


def _digest_slot(data: bytearray) -> slice:
    """Where the 64 hex digits of the digest lie in a checkpoint's bytes: in its JSON header, where the
    field appears once (inside the metadata's JSON-encoded values every quote is escaped)."""
    end = 8 + int.from_bytes(data[:8], "little")
    start = data.find(_DIGEST_FIELD, 0, end)
    if start < 0 or data.find(_DIGEST_FIELD, start + 1, end) >= 0:
        raise ValueError(f"no single {DIGEST_KEY} field in the header")
    start += len(_DIGEST_FIELD)
    return slice(start, start + len(_PLACEHOLDER))


def _load_module(model: nn.Module, state: dict) -> None:
    if not state:
        raise KeyError("no tensors for this model")
    model.load_state_dict(state, strict=True)
