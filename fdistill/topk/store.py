"""A teacher's top-k log-probabilities for a dataset, in sharded safetensors files.

A directory holds ``manifest.json`` and shards ``shard-00000.safetensors``, ``shard-00001...``. Each
shard holds whole sequences, concatenated along the tokens:

=============  ==================  ===========================================================
``indices``    int32 / int64       ``[tokens, k]`` top-k token ids of each position
``logprobs``   float32             ``[tokens, k]`` their log-probabilities
``offsets``    int64               ``[sequences + 1]`` where each sequence starts (from 0)
=============  ==================  ===========================================================

The manifest (JSON) records the format and version, ``k``, ``vocab_size``, the dtypes, the
sequence and token counts, whether the write finished (``complete``), the caller's ``meta`` and,
per shard, its file name, first sequence, sequence and token counts, size in bytes and sha256.

Writes are atomic and resumable: each shard is written to a temporary file and renamed
(:func:`fdistill.trainer.files.write_atomic`), then the manifest is rewritten the same way to list
it. A write that is killed leaves the shards the manifest lists intact; calling
:func:`write_topk` again resumes after the last of them (the teacher is not run again for the
sequences they hold). Reads verify each shard's sha256 against the manifest when the shard is first
loaded: a changed byte is a :class:`TopKFileError` naming the file.

safetensors (and tqdm for the progress bar) come with the ``trainer`` extra:
``pip install 'fdistill[trainer]'``; their absence is reported before anything is written.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..trainer.extras import require
from ..trainer.files import write_atomic
from ..validation import check_int
from .temperature import topk_from_logits

FORMAT = "fdistill-topk"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD = "shard-{:05d}.safetensors"
_IDS_DTYPES = {"int32": torch.int32, "int64": torch.int64}
_USES = {"safetensors": "the top-k shard files", "tqdm": "the progress bar; or pass progress=False"}


class TopKFileError(RuntimeError):
    """A top-k directory that is missing, corrupt (a checksum that does not match) or inconsistent."""


class TopK(NamedTuple):
    """One sequence's top-k: ``indices`` ``[T, k]`` (the stored integer dtype) and ``logprobs``
    ``[T, k]`` float32. A pair, so it can be passed as ``teacher_topk`` as it is."""

    indices: torch.Tensor
    logprobs: torch.Tensor


class TopKBatch(NamedTuple):
    """Sequences padded to ``[B, T, k]``: ``indices`` int64, ``logprobs`` float32, ``mask`` ``[B, T]``
    bool (True at real positions), ``lengths`` ``[B]`` int64. Padded positions hold a valid
    placeholder (ids ``0..k-1``, log-probability ``-log k``) so that the value checks of the losses
    pass; ignore them through the labels (:meth:`ignore_padding`)."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def teacher_topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices, self.logprobs

    def ignore_padding(self, labels: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """``labels`` (``[B, T]``; zeros when None) with ``ignore_index`` at the padded positions."""
        if labels is None:
            labels = torch.zeros(self.mask.shape, dtype=torch.long, device=self.mask.device)
        if labels.shape != self.mask.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must be the batch's [B, T] = "
                             f"{tuple(self.mask.shape)}")  # fmt: skip
        return labels.masked_fill(~self.mask.to(labels.device), ignore_index)

    def to(self, device) -> TopKBatch:
        return TopKBatch(*(x.to(device) for x in self))


# ----------------------------------------------------------------------------- writing


def write_topk(
    directory: str | os.PathLike,
    dataset: Iterable[Any],
    teacher: Callable[[Any], Any],
    *,
    k: int,
    vocab_size: int,
    shard_tokens: int = 1 << 20,
    ids_dtype: torch.dtype = torch.int32,
    temperature: float = 1.0,
    meta: dict | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run ``teacher`` on every example of ``dataset`` and store its top-k; returns the manifest.

    Args:
        directory: created if needed. If it holds an unfinished write with the same settings, the
            write resumes after its last complete shard; a finished one is returned as it is.
        dataset: examples in a fixed order (a list, a ``torch.utils.data.Dataset``, any iterable
            that yields the same sequence again); on a resume the examples already stored are
            skipped without calling ``teacher``. ``len(dataset)``, where defined, sizes the bar.
        teacher: ``teacher(example)`` returns either logits ``[T, vocab_size]`` (the top-k of
            ``log_softmax(logits / temperature)`` is stored) or a pair ``(indices, logprobs)`` of
            ``[T, k]`` tensors (stored as given: ids in ``[0, vocab_size)``, log-probabilities
            ``<= 0`` or ``-inf``, no NaN).
        k, vocab_size: the top-k width and the teacher's vocabulary size.
        shard_tokens: a shard is closed once it holds at least this many tokens (whole sequences).
        ids_dtype: ``torch.int32`` (default; vocabularies below 2^31) or ``torch.int64``.
        temperature: applied to logits returned by ``teacher`` (recorded in the manifest's
            ``meta["temperature"]``; :func:`fdistill.topk.retemper` changes it afterwards).
        meta: JSON-able facts to keep with the data (teacher name, prompt template, ...).
        progress: a tqdm bar over the sequences (off when stderr is not a terminal).
        overwrite: delete a previous write in ``directory`` (its manifest, shards and temporary
            files; nothing else) and start over.
    """
    require("safetensors", *(["tqdm"] if progress else []), who="fdistill.topk.write_topk", uses=_USES)
    from safetensors.torch import save

    from ..trainer.loop import Progress

    k = check_int("k", k)
    vocab_size = check_int("vocab_size", vocab_size)
    shard_tokens = check_int("shard_tokens", shard_tokens)
    if k < 1 or vocab_size < 1 or shard_tokens < 1 or k > vocab_size:
        raise ValueError(f"need 1 <= k <= vocab_size and shard_tokens >= 1, got k={k}, "
                         f"vocab_size={vocab_size}, shard_tokens={shard_tokens}")  # fmt: skip
    ids_name = {v: n for n, v in _IDS_DTYPES.items()}.get(ids_dtype)
    if ids_name is None:
        raise ValueError(f"ids_dtype must be torch.int32 or torch.int64, got {ids_dtype}")
    if ids_dtype == torch.int32 and vocab_size > 2**31 - 1:
        raise ValueError(f"vocab_size {vocab_size} does not fit int32 ids: pass ids_dtype=torch.int64")
    meta = dict(meta or {})
    meta.setdefault("temperature", float(temperature))
    json.dumps(meta)  # JSON-able, or a TypeError now rather than after the first shard

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {"format": FORMAT, "version": VERSION, "k": k, "vocab_size": vocab_size,
                "ids_dtype": ids_name, "logprobs_dtype": "float32"}  # fmt: skip
    manifest = _start(directory, settings, meta, overwrite)
    if manifest["complete"]:
        return manifest

    done = manifest["num_sequences"]
    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = Progress(total, "teacher top-k", enabled=progress)
    bar.update(done)
    pending: list[TopK] = []
    pending_tokens = 0

    def flush():
        nonlocal pending, pending_tokens
        lengths = [p.indices.shape[0] for p in pending]
        offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
        tensors = {
            "indices": torch.cat([p.indices for p in pending]).to(ids_dtype).contiguous(),
            "logprobs": torch.cat([p.logprobs for p in pending]).to(torch.float32).contiguous(),
            "offsets": offsets,
        }
        first = manifest["num_sequences"]
        name = _SHARD.format(len(manifest["shards"]))
        # one metadata key: safetensors writes several in no fixed order, and the same data should
        # give the same bytes (and sha256) on every run
        data = save(tensors, metadata={FORMAT: json.dumps({"first_sequence": first, "k": k})})
        write_atomic(directory / name, data)
        manifest["shards"].append({"file": name, "first_sequence": first, "num_sequences": len(pending),
                                   "num_tokens": pending_tokens, "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
        manifest["num_sequences"] += len(pending)
        manifest["num_tokens"] += pending_tokens
        _write_manifest(directory, manifest)
        pending, pending_tokens = [], 0

    try:
        for index, example in enumerate(dataset):
            if index < done:
                continue
            item = _as_topk(teacher(example), k, vocab_size, temperature, index)
            pending.append(item)
            pending_tokens += item.indices.shape[0]
            if pending_tokens >= shard_tokens:
                flush()
            bar.update()
        if pending:
            flush()
        manifest["complete"] = True
        _write_manifest(directory, manifest)
    finally:
        bar.close()
    return manifest


def _start(directory: Path, settings: dict, meta: dict, overwrite: bool) -> dict:
    """The manifest to continue from: a previous unfinished (or finished) write with the same
    settings, or a new empty one (written at once, so a resume knows the settings)."""
    path = directory / MANIFEST
    if overwrite:
        for f in [path, *_shard_files(directory), *directory.glob("*.tmp")]:
            f.unlink(missing_ok=True)
    if path.exists():
        manifest = _read_manifest(path)
        for key, want in settings.items():
            if manifest.get(key) != want:
                raise ValueError(
                    f"{path} was written with {key}={manifest.get(key)!r}, this call has {key}={want!r}: "
                    "pass the same settings to resume, or overwrite=True to start over"
                )
        if manifest.get("meta") != meta:
            raise ValueError(f"{path} was written with meta={manifest.get('meta')!r}, this call has "
                             f"meta={meta!r}: pass the same to resume, or overwrite=True to start "
                             "over")  # fmt: skip
        for shard in manifest["shards"]:
            file = directory / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["bytes"]:
                raise TopKFileError(f"top-k shard {file} listed in {path} is missing or has the wrong size; "
                                    "pass overwrite=True to start over")  # fmt: skip
    else:
        manifest = {**settings, "complete": False, "num_sequences": 0, "num_tokens": 0, "meta": meta,
                    "shards": []}  # fmt: skip
    # what a killed write may have left: a temporary file, a shard written but not yet listed
    listed = {s["file"] for s in manifest["shards"]}
    for f in [*directory.glob("*.tmp"), *(f for f in _shard_files(directory) if f.name not in listed)]:
        f.unlink(missing_ok=True)
    if not path.exists():
        _write_manifest(directory, manifest)
    return manifest


def _shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.safetensors"))


def _write_manifest(directory: Path, manifest: dict) -> None:
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        if manifest.get("version") != VERSION:
            raise ValueError(f"version {manifest.get('version')!r} (this fdistill reads {VERSION})")
        for key in ("k", "vocab_size", "ids_dtype", "num_sequences", "num_tokens", "complete", "shards"):
            if key not in manifest:
                raise ValueError(f"no {key!r}")
    except (OSError, ValueError, AttributeError) as exc:
        raise TopKFileError(
            f"top-k manifest {path} is unreadable or not an fdistill top-k manifest ({exc})"
        ) from exc
    return manifest


def _as_topk(out, k: int, vocab: int, temperature: float, index: int) -> TopK:
    """The teacher's output for sequence ``index`` as a checked ``TopK`` (CPU tensors)."""
    where = f"teacher output for sequence {index}"
    if isinstance(out, torch.Tensor):
        if not out.dtype.is_floating_point or out.dim() != 2 or out.shape[1] != vocab:
            raise ValueError(f"{where}: logits must be a float [T, vocab_size={vocab}] tensor, got "
                             f"{out.dtype} {tuple(out.shape)}")  # fmt: skip
        indices, logprobs = topk_from_logits(out, k, temperature)
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        indices, logprobs = out
        if not isinstance(indices, torch.Tensor) or not isinstance(logprobs, torch.Tensor):
            raise TypeError(f"{where}: (indices, logprobs) must be tensors")
        bad_ids = indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool
        if bad_ids or not logprobs.dtype.is_floating_point:
            raise TypeError(f"{where}: indices must be integers and logprobs floats, got "
                            f"{indices.dtype} and {logprobs.dtype}")  # fmt: skip
        if indices.shape != logprobs.shape or indices.dim() != 2 or indices.shape[1] != k:
            raise ValueError(f"{where}: indices {tuple(indices.shape)} and logprobs {tuple(logprobs.shape)} "
                             f"must both be [T, k={k}]")  # fmt: skip
    else:
        raise TypeError(
            f"{where}: expected logits [T, V] or a pair (indices, logprobs), got {type(out).__name__}"
        )
    indices, logprobs = indices.detach().cpu().long(), logprobs.detach().cpu().float()
    if indices.numel():
        if indices.min() < 0 or indices.max() >= vocab:
            raise ValueError(f"{where}: indices must be in [0, vocab_size={vocab})")
        if k > 1 and (indices.sort(-1).values.diff(dim=-1) == 0).any():
            raise ValueError(f"{where}: indices must be distinct within each position")
        if not logprobs.amax() <= 1e-4:
            raise ValueError(
                f"{where}: logprobs must be log-probabilities (<= 0, or -inf), without NaN or +inf"
            )
    return TopK(indices, logprobs)


def truncate_topk(directory: str | os.PathLike, num_shards: int) -> dict:
    """Keep the first ``num_shards`` shards of a write (e.g. before a corrupt one), delete the rest
    and mark the write unfinished, so that :func:`write_topk` recomputes from there."""
    directory = Path(directory)
    path = directory / MANIFEST
    manifest = _read_manifest(path)
    num_shards = check_int("num_shards", num_shards)
    if not 0 <= num_shards <= len(manifest["shards"]):
        raise ValueError(f"num_shards must be in [0, {len(manifest['shards'])}], got {num_shards}")
    kept, dropped = manifest["shards"][:num_shards], manifest["shards"][num_shards:]
    manifest.update(shards=kept, complete=False, num_sequences=sum(s["num_sequences"] for s in kept),
                    num_tokens=sum(s["num_tokens"] for s in kept))  # fmt: skip
    _write_manifest(directory, manifest)  # first: a kill now leaves unlisted shards, removed on resume
    for shard in dropped:
        (directory / shard["file"]).unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------- reading


class TopKDataset:
    """The sequences of a top-k directory, by index: ``dataset[i]`` is a :class:`TopK`
    (``[T_i, k]`` ids and log-probabilities); :meth:`batch` pads several to ``[B, T, k]``.

    Shards are loaded on first use (``cache_shards`` of them kept) and their sha256 checked against
    the manifest then (``verify=False`` skips it; :meth:`verify` checks every shard at once). An
    unfinished write is refused unless ``allow_incomplete=True`` (its complete shards are read).
    """

    def __init__(self, directory: str | os.PathLike, *, verify: bool = True, allow_incomplete: bool = False,
                 cache_shards: int = 2):  # fmt: skip
        require("safetensors", who="fdistill.topk.TopKDataset", uses=_USES)
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory / MANIFEST)
        if not self.manifest["complete"] and not allow_incomplete:
            raise TopKFileError(
                f"the top-k write in {self.directory} did not finish ({self.manifest['num_sequences']} "
                "sequences stored): call write_topk again to resume it, or pass allow_incomplete=True"
            )
        self.check_sums = verify
        self.cache_shards = max(1, check_int("cache_shards", cache_shards))
        self._firsts = [s["first_sequence"] for s in self.manifest["shards"]]
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self.ids_dtype = _IDS_DTYPES[self.manifest["ids_dtype"]]

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def meta(self) -> dict:
        return self.manifest["meta"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["num_tokens"]

    def __len__(self) -> int:
        return self.manifest["num_sequences"]

    def __getitem__(self, index: int) -> TopK:
        index = check_int("index", index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sequence {index} out of range for {n} sequences")
        index %= n
        j = bisect.bisect_right(self._firsts, index) - 1
        shard = self._shard(j)
        local = index - self._firsts[j]
        start, end = int(shard["offsets"][local]), int(shard["offsets"][local + 1])
        return TopK(shard["indices"][start:end], shard["logprobs"][start:end])

    def batch(self, indices: Iterable[int], pad_to: int | None = None) -> TopKBatch:
        """The sequences ``indices`` padded to ``[B, T, k]`` (T the longest, or ``pad_to``)."""
        return collate_topk([self[i] for i in indices], pad_to=pad_to, k=self.k)

    def verify(self) -> None:
        """Check every shard's sha256 (and layout) now; raises :class:`TopKFileError` on the first bad
        one."""
        for j in range(len(self.manifest["shards"])):
            self._load(j, True)

    def _shard(self, j: int) -> dict:
        if j in self._cache:
            self._cache.move_to_end(j)
            return self._cache[j]
        tensors = self._load(j, self.check_sums)
        self._cache[j] = tensors
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return tensors

    def _load(self, j: int, check_sum: bool) -> dict:
        from safetensors.torch import load

        entry = self.manifest["shards"][j]
        path = self.directory / entry["file"]
        recover = (f"rerun the write from there: fdistill.topk.truncate_topk({str(self.directory)!r}, {j}) "
                   "then write_topk(...) with the same arguments")  # fmt: skip
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TopKFileError(f"top-k shard {path} cannot be read ({exc}); {recover}") from exc
        if check_sum and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise TopKFileError(
                f"top-k shard {path} is corrupt: its sha256 does not match the one in "
                f"{self.directory / MANIFEST} (a changed or truncated byte); {recover}"
            )
        try:
            tensors = load(data)
            ids, lp, offsets = tensors["indices"], tensors["logprobs"], tensors["offsets"]
            n, t = entry["num_sequences"], entry["num_tokens"]
            ok = ids.shape == lp.shape == (t, self.k) and ids.dtype == self.ids_dtype
            ok = ok and lp.dtype == torch.float32 and offsets.shape == (n + 1,) and int(offsets[-1]) == t
            if not ok:
                raise ValueError("its tensors do not match the manifest's shapes and dtypes")
        except Exception as exc:  # safetensors and the checks above raise several types
            raise TopKFileError(f"top-k shard {path} is corrupt or unreadable ({exc}); {recover}") from exc
        return {"indices": ids, "logprobs": lp, "offsets": offsets}


def collate_topk(items: list[tuple[torch.Tensor, torch.Tensor]], pad_to: int | None = None,
                 k: int | None = None) -> TopKBatch:  # fmt: skip
    """Pad ``[T_i, k]`` pairs to a :class:`TopKBatch` ``[B, T, k]`` (a ``collate_fn`` for a
    ``DataLoader`` over a :class:`TopKDataset`)."""
    if not items and k is None:
        raise ValueError("an empty batch needs k")
    k = items[0][0].shape[-1] if items else k
    lengths = [ids.shape[0] for ids, _ in items]
    longest = max(lengths, default=0)
    t = longest if pad_to is None else check_int("pad_to", pad_to)
    if t < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({longest})")
    b = len(items)
    indices = torch.arange(k, dtype=torch.int64).expand(b, t, k).clone()
    logprobs = torch.full((b, t, k), -math.log(k), dtype=torch.float32)
    mask = torch.zeros((b, t), dtype=torch.bool)
    for row, (ids, lp) in enumerate(items):
        n = ids.shape[0]
        if ids.shape != (n, k) or lp.shape != (n, k):
            raise ValueError(
                f"item {row}: indices {tuple(ids.shape)} and logprobs {tuple(lp.shape)} must be [T, {k}]"
            )
        indices[row, :n] = ids
        logprobs[row, :n] = lp
        mask[row, :n] = True
    return TopKBatch(indices, logprobs, mask, torch.tensor(lengths, dtype=torch.int64))
