"""Readers for the top-k log-probabilities that vLLM-based pipelines store, as axolotl's KD plugin
(``axolotl.integrations.kd``) lays them out in its datasets. Written from that layout, no code taken.

Two layouts:

* **Raw vLLM logprobs**, one entry per position (the dataset's ``logprobs_field``): ``None`` or an
  empty list where the teacher gave nothing (the first prompt position), else the position's top-k
  as any of

  - a list of ``{"token": "token_id:123", "logprob": -0.1}`` (vLLM's OpenAI-compatible server with
    ``return_tokens_as_token_ids``; what axolotl's ``chat_template`` KD strategy parses),
  - a list of ``{"token_id": 123, "logprob": -0.1}``,
  - a dict ``{123: -0.1}`` or ``{123: Logprob(logprob=-0.1, ...)}`` (vLLM's own ``prompt_logprobs``),
  - a dict with a ``"top_logprobs"`` list of the above (an OpenAI ``logprobs.content`` entry),
  - a list of floats, with the ids as a parallel ``token_ids`` list of lists (axolotl's "v2"
    layout: ``target_token_ids`` given with the logprobs).

  The logprobs cover the *last* positions of the sequence: with ``length`` (the sequence's token
  count) a shorter list is left-padded with masked positions, as axolotl does.
* **Processed KD columns** (what axolotl's strategies write and its collator pads): parallel
  ``target_token_ids`` ``[T][k]``, ``target_logprobs`` ``[T][k]`` and ``target_mask`` ``[T][k]``
  (1 = use), read by :func:`read_axolotl_kd`.

Both return a :class:`TopKPositions`: ``indices`` ``[T, k]`` int64, ``logprobs`` ``[T, k]`` float32
and ``mask`` ``[T]`` bool. A position's entries are sorted by log-probability (most likely first)
and cut to ``k``: by default the smallest count found at any unmasked position (vLLM may add the
sampled token as a (k + 1)-th entry at some positions). Masked positions hold the placeholder of
:class:`fdistill.topk.TopKBatch` (ids ``0..k-1``, log-probability ``-log k``). The log-probabilities
are kept as stored (no renormalisation; :func:`fdistill.topk.retemper` does that, with a
temperature change).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

_TOKEN_PREFIX = "token_id:"


class TopKPositions(NamedTuple):
    """One sequence's top-k by position: ``indices`` / ``logprobs`` ``[T, k]``, ``mask`` ``[T]``."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor

    @property
    def teacher_topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices, self.logprobs


def read_vllm_logprobs(
    positions: Sequence[Any],
    *,
    token_ids: Sequence[Any] | None = None,
    k: int | None = None,
    length: int | None = None,
) -> TopKPositions:
    """Raw vLLM logprobs, one entry per position (see the module docstring for the accepted forms)."""
    if isinstance(positions, (str, bytes, Mapping)) or not isinstance(positions, Sequence):
        raise TypeError(f"positions must be a list (one entry per position), got {type(positions).__name__}")
    if token_ids is not None and len(token_ids) != len(positions):
        raise ValueError(f"token_ids has {len(token_ids)} positions, the logprobs {len(positions)}")
    rows = []
    for t, entry in enumerate(positions):
        ids = None if token_ids is None else token_ids[t]
        rows.append(_position(entry, ids, t))
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        if len(rows) > length:
            raise ValueError(f"{len(rows)} logprob positions for a sequence of {length} tokens")
        rows = [None] * (length - len(rows)) + rows
    return _assemble(rows, k)


def read_axolotl_kd(example: Mapping[str, Any], *, k: int | None = None) -> TopKPositions:
    """axolotl's processed KD columns of one example: ``target_token_ids``, ``target_logprobs`` and
    (optional) ``target_mask``, each ``[T][k]`` (lists, numpy arrays or tensors; rows may differ in
    length). A position is used where any of its mask entries is 1; within it, entries whose mask is
    0 (the collator's padding of short rows) are dropped."""
    for key in ("target_token_ids", "target_logprobs"):
        if key not in example:
            raise KeyError(f"the example has no {key!r} column (axolotl's KD layout)")
    ids_col, lp_col = _rows(example["target_token_ids"]), _rows(example["target_logprobs"])
    mask_col = _rows(example["target_mask"]) if example.get("target_mask") is not None else None
    if len(ids_col) != len(lp_col) or (mask_col is not None and len(mask_col) != len(ids_col)):
        raise ValueError(
            f"target_token_ids ({len(ids_col)} positions), target_logprobs ({len(lp_col)}) and target_mask "
            f"({'-' if mask_col is None else len(mask_col)}) must have one row per position"
        )
    rows = []
    for t, (ids, lps) in enumerate(zip(ids_col, lp_col, strict=True)):
        ids, lps = _rows(ids), _rows(lps)
        if len(ids) != len(lps):
            raise ValueError(f"position {t}: {len(ids)} target_token_ids but {len(lps)} target_logprobs")
        use = [True] * len(ids) if mask_col is None else [bool(m) for m in _rows(mask_col[t])]
        if len(use) != len(ids):
            raise ValueError(f"position {t}: target_mask has {len(use)} entries, target_token_ids {len(ids)}")
        pairs = [(_token_id(i, t), _logprob(lp, t)) for i, lp, u in zip(ids, lps, use, strict=True) if u]
        rows.append(pairs or None)
    return _assemble([_sorted(p, t) if p else None for t, p in enumerate(rows)], k)


# ----------------------------------------------------------------------------- helpers


def _rows(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "tolist"):  # numpy
        return x.tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"expected a list, got {type(x).__name__}")
    return list(x)


def _position(entry, ids, t: int):
    """[(id, logprob)] sorted by logprob (descending), or None for a position without logprobs."""
    if entry is None:
        return None
    if isinstance(entry, Mapping) and "top_logprobs" in entry:
        entry = entry["top_logprobs"]
    if ids is not None:
        ids, lps = _rows(ids), _rows(entry)
        if len(ids) != len(lps):
            raise ValueError(f"position {t}: {len(ids)} token ids but {len(lps)} logprobs")
        pairs = [(_token_id(i, t), _logprob(lp, t)) for i, lp in zip(ids, lps, strict=True)]
    elif isinstance(entry, Mapping):
        pairs = [(_token_id(i, t), _logprob(lp, t)) for i, lp in entry.items()]
    elif isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)):
        pairs = []
        for item in entry:
            if not isinstance(item, Mapping) or "logprob" not in item:
                raise ValueError(f"position {t}: expected {{'token': 'token_id:N', 'logprob': x}} entries, "
                                 f"got {item!r}")  # fmt: skip
            token = item.get("token_id", item.get("token"))
            pairs.append((_token_id(token, t), _logprob(item["logprob"], t)))
    else:
        raise TypeError(
            f"position {t}: expected None, a list or a dict of logprobs, got {type(entry).__name__}"
        )
    return _sorted(pairs, t) if pairs else None


def _sorted(pairs, t: int):
    if len({i for i, _ in pairs}) != len(pairs):
        raise ValueError(f"position {t}: a token id appears twice")
    return sorted(pairs, key=lambda p: -p[1])


def _token_id(token, t: int) -> int:
    if isinstance(token, str):
        text = token[len(_TOKEN_PREFIX) :] if token.startswith(_TOKEN_PREFIX) else token
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"position {t}: token {token!r} is not an id: store ids ('token_id:N', as vLLM's "
                "return_tokens_as_token_ids gives them), not decoded text"
            ) from None
    elif isinstance(token, numbers.Integral) and not isinstance(token, bool):
        value = int(token)
    else:
        raise ValueError(f"position {t}: token id {token!r} is not an int or 'token_id:N'")
    if value < 0:
        raise ValueError(f"position {t}: token id {value} is negative")
    return value


def _logprob(value, t: int) -> float:
    value = getattr(value, "logprob", value)  # vLLM's Logprob objects
    if isinstance(value, Mapping):
        value = value.get("logprob")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"position {t}: logprob {value!r} is not a number")
    value = float(value)
    if math.isnan(value) or value > 1e-4:
        raise ValueError(f"position {t}: logprob {value} is not a log-probability (<= 0, or -inf)")
    return value


def _assemble(rows, k: int | None) -> TopKPositions:
    counts = [len(r) for r in rows if r]
    if k is None:
        if not counts:
            raise ValueError("no position has logprobs: pass k to read an all-masked sequence")
        k = min(counts)
    elif isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    short = [n for n in counts if n < k]
    if short:
        raise ValueError(f"k={k} but some position has only {min(short)} logprobs")
    n = len(rows)
    indices = torch.arange(k, dtype=torch.int64).expand(n, k).clone()
    logprobs = torch.full((n, k), -math.log(k), dtype=torch.float32)
    mask = torch.zeros(n, dtype=torch.bool)
    for t, row in enumerate(rows):
        if row:
            indices[t] = torch.tensor([i for i, _ in row[:k]], dtype=torch.int64)
            logprobs[t] = torch.tensor([lp for _, lp in row[:k]], dtype=torch.float32)
            mask[t] = True
    return TopKPositions(indices, logprobs, mask)
