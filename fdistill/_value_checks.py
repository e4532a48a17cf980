"""Checks of tensor values (labels in range, probabilities on the simplex, positive references) that
cost one host sync per call, whatever their number.

Each check adds a boolean scalar tensor (True = bad) computed where the data lives, without
``(tokens x V)`` temporaries; :meth:`ValueChecks.raise_first` reads them all in one device-to-host
copy and raises the first failure's error (built only then, so a message may read more values).
While torch.compile traces, values cannot be read: :meth:`ValueChecks.active` is False and the
checks are skipped (the kernels still give NaN for out-of-range labels).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class ValueChecks:
    """A call's value checks. ``enabled=False``: none are made (the values were checked once
    before, e.g. for the whole batch before a fused-linear loss walks it chunk by chunk)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._checks: list[tuple[torch.Tensor, Callable[[], Exception]]] = []

    def active(self) -> bool:
        return self.enabled and not torch.compiler.is_compiling()

    def add(self, bad: torch.Tensor, error: Callable[[], Exception]) -> None:
        self._checks.append((bad.reshape(()), error))

    def raise_first(self) -> None:
        """Reads every flag (one sync) and raises the first failed check's error."""
        if not self._checks:
            return
        flags = torch.stack([bad.to(torch.bool) for bad, _ in self._checks]).tolist()
        checks, self._checks = self._checks, []
        for flag, (_, error) in zip(flags, checks, strict=True):
            if flag:
                raise error()


def not_finite_or_negative(x: torch.Tensor, *, positive: bool = False) -> torch.Tensor:
    """True when some entry of ``x`` is NaN, infinite or negative (``positive``: not > 0), from one
    ``aminmax`` read of ``x`` (no temporaries of its size; NaN propagates to both ends)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x)
    low_ok = lo > 0 if positive else lo >= 0
    return ~low_ok | ~(hi < math.inf)


def label_out_of_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """True when a label other than ``ignore_index`` is outside [0, vocab)."""
    return (((labels < 0) | (labels >= vocab)) & (labels != ignore_index)).any()


def off_simplex(probs: torch.Tensor, tol: float) -> torch.Tensor:
    """Per row of ``probs``: whether it does not sum to 1 within ``tol`` (see :func:`rows_off_simplex`)."""
    return (probs.sum(-1).to(torch.float64) - 1).abs() > tol


def rows_off_simplex(probs: torch.Tensor, tol: float) -> torch.Tensor:
    """True when some row of ``probs`` (non-negative, checked apart) does not sum to 1 within ``tol``;
    summed in the target's own dtype (a cascade sum: rounding ~1e-6 relative at V = 256k in float32, and
    a bf16 / fp16 sum rounds to 4e-3 at most, both well inside ``tol``). ``sum(dtype=torch.float64)``
    would copy the whole target to float64 first (84 ms for 1024 x 32000 on 2 cores, 25x the sum)."""
    if probs.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=probs.device)
    return off_simplex(probs, tol).any()
