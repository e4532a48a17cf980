"""Teacher-hacking monitor: a power-law convergence fit on the early curve, and the departures from it.

Distillation normally converges polynomially: ``log golden`` is linear in ``log proxy`` (and both in
``log step``). Teacher hacking (Tiapkin et al., 2025) is the student improving on the proxy
(distance to the teacher) while the golden metric (distance to the oracle) gets worse. The monitor

1. fits ``log y = a + b log x`` by least squares on ``fit_points`` evaluations after the first
   ``skip`` (an initial transient, e.g. a student far from the teacher at step 0), where ``y`` is
   golden and ``x`` is proxy (``law="golden_vs_proxy"``) or the step (``"golden_vs_step"``);
2. flags the **departure step**: the first of ``patience`` consecutive later evaluations whose
   ``log y`` exceeds the fitted law by more than ``tolerance`` (natural-log units: 0.1 is 10%);
3. flags the **hacking step**: the first of ``patience`` consecutive evaluations where golden is above
   its running minimum by more than ``tolerance`` (relative) while proxy is still below its value at
   that minimum (proxy improving, golden worse).

Use it as a callback: ``monitor.update(step, proxy=..., golden=...)`` after each evaluation; it
returns the events raised by that point (strings), and ``monitor.summary()`` the fit and the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LAWS = ("golden_vs_proxy", "golden_vs_step")


@dataclass
class TeacherHackingMonitor:
    fit_points: int = 5
    tolerance: float = 0.1
    patience: int = 2
    law: str = "golden_vs_proxy"
    skip: int = 0
    steps: list = field(default_factory=list)
    proxy: list = field(default_factory=list)
    golden: list = field(default_factory=list)
    fit: tuple | None = None  # (a, b) of log y = a + b log x
    departure_step: int | None = None
    hacking_step: int | None = None

    def __post_init__(self):
        if self.law not in LAWS:
            raise ValueError(f"law must be one of {list(LAWS)}, got {self.law!r}")
        if self.fit_points < 2 or self.patience < 1 or not self.tolerance > 0 or self.skip < 0:
            raise ValueError("fit_points must be >= 2, patience >= 1, tolerance > 0 and skip >= 0")

    def _x(self, i: int) -> float:
        return self.proxy[i] if self.law == "golden_vs_proxy" else max(self.steps[i], 1)

    def update(self, step: int, *, proxy: float, golden: float) -> list[str]:
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"steps must increase: {step} after {self.steps[-1]}")
        self.steps.append(int(step))
        self.proxy.append(float(proxy))
        self.golden.append(float(golden))
        events = []
        n, end = len(self.steps), self.skip + self.fit_points  # the fit window: evaluations [skip, end)
        if n == end:
            window = range(self.skip, end)
            self.fit = fit_power_law([self._x(i) for i in window], [self.golden[i] for i in window])
        if self.fit is not None and n > end and self.departure_step is None:
            recent = range(n - self.patience, n)
            if min(recent) >= end and all(self.residual(i) > self.tolerance for i in recent):
                self.departure_step = self.steps[n - self.patience]
                events.append(f"step {self.departure_step}: golden departs from the early power law")
        recent = range(n - self.patience, n)
        if self.hacking_step is None and n > self.patience and all(self._hacking_at(i) for i in recent):
            self.hacking_step = self.steps[n - self.patience]
            events.append(f"step {self.hacking_step}: golden rises while proxy still falls (teacher hacking)")
        return events

    def residual(self, i: int) -> float:
        """log golden minus the fitted law at evaluation ``i``."""
        a, b = self.fit
        return _log(self.golden[i]) - (a + b * _log(self._x(i)))

    def _hacking_at(self, i: int) -> bool:
        best = min(range(i + 1), key=lambda j: self.golden[j])
        return self.golden[i] > self.golden[best] * (1 + self.tolerance) and self.proxy[i] < self.proxy[best]

    def summary(self) -> dict:
        return {
            "law": self.law,
            "fit": None if self.fit is None else {"log_a": self.fit[0], "exponent": self.fit[1]},
            "fit_points": self.fit_points,
            "skip": self.skip,
            "tolerance": self.tolerance,
            "departure_step": self.departure_step,
            "hacking_step": self.hacking_step,
        }


def fit_power_law(x, y) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``log y = a + b log x``."""
    lx, ly = [_log(v) for v in x], [_log(v) for v in y]
    n = len(lx)
    mx, my = sum(lx) / n, sum(ly) / n
    sxx = sum((u - mx) ** 2 for u in lx)
    b = 0.0 if sxx == 0 else sum((u - mx) * (v - my) for u, v in zip(lx, ly, strict=True)) / sxx
    return my - b * mx, b


def _log(v: float) -> float:
    return math.log(max(v, 1e-12))
