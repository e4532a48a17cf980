"""Timing, peak memory and failure handling of the GPU benchmarks (CUDA; CPU for ``--dry-run``).

The GPU is lent rarely and briefly, so no single failure may lose a run: every measurement goes
through :func:`guarded`, which turns out-of-memory into the cell ``OOM`` (and frees the cached
blocks), any other exception into ``error`` (traceback printed), and a spent time budget into
``skipped``.

Times are medians of calls to ``fn`` alone: an optional ``setup`` runs before every call, untimed
(e.g. restoring logits that ``grad_in_place=True`` overwrote with their gradient). On CUDA they are
taken with CUDA events around ``fn`` only, after flushing the L2 cache (as ``triton.testing.do_bench``
does, which has no untimed per-call setup); on CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable

import torch

from .harness import peak_memory_bytes

OOM, ERROR, SKIPPED = "OOM", "error", "skipped"
FAILURES = (OOM, ERROR, SKIPPED)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Budget:
    """A wall-clock budget in seconds from its creation (None: unlimited)."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def guarded(what: str, fn: Callable[[], object], budget: Budget | None = None):
    """``fn()``, or the cell to print instead when it fails: OOM, error or skipped."""
    if budget is not None and budget.spent():
        return SKIPPED
    failure = None
    try:
        return fn()
    except Exception as err:  # every failure becomes a cell; KeyboardInterrupt (timeout) still stops
        failure = OOM if is_oom(err) else ERROR
        if failure == OOM:
            print(f"OOM: {what}: {str(err).splitlines()[0][:200]}", flush=True)
        else:
            print(f"error: {what}:", flush=True)
            traceback.print_exc()
    # Here, outside the except block, the traceback and the tensors its frames held are released.
    free_memory()
    return failure


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Median milliseconds of ``fn()``: CUDA events on the GPU, perf_counter on CPU.

    CUDA: 3 calls estimate the time, then warm-up calls fill ``warmup_ms`` and timed calls ``rep_ms``
    (between ``min_reps`` and ``max_reps``): a small ``rep_ms`` keeps the whole check inside its
    lease. CPU (dry runs): ``cpu_warmup`` untimed calls, then ``cpu_reps`` timed ones.
    """

    def __init__(self, device, warmup_ms=25.0, rep_ms=100.0, min_reps=5, max_reps=100, cpu_warmup=0,
                 cpu_reps=1):  # fmt: skip
        self.device = torch.device(device)
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        self.cpu_warmup, self.cpu_reps = cpu_warmup, cpu_reps
        self._flush = None

    def ms(self, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
        if self.device.type == "cuda":
            return self._cuda_ms(fn, setup)
        times = []
        for i in range(self.cpu_warmup + self.cpu_reps):
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            if i >= self.cpu_warmup:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def _cuda_ms(self, fn, setup):
        if self._flush is None:  # larger than any L2 cache (50 MB on H100, 60 MB on H200)
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)

        def calls(n):
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(n)]  # fmt: skip
            for start, end in events:
                if setup is not None:
                    setup()
                self._flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) for start, end in events]

        calls(1)  # compiles (Triton JIT, autotuning) outside the estimate
        estimate = max(statistics.median(calls(3)), 1e-3)
        calls(min(self.max_reps, int(self.warmup_ms / estimate)))
        reps = min(self.max_reps, max(self.min_reps, int(self.rep_ms / estimate)))
        return statistics.median(calls(reps))


def peak_bytes(fn: Callable[[], object], device, setup: Callable[[], object] | None = None) -> int | None:
    """Memory ``fn()`` allocates at its peak beyond what exists when it starts (after ``setup``).

    CUDA: ``torch.cuda.max_memory_allocated``; CPU: the resident-set high-water mark (None where
    the kernel cannot reset it).
    """
    device = torch.device(device)
    if setup is not None:
        setup()
    if device.type != "cuda":
        return peak_memory_bytes(fn)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def triton_runs_on(device) -> bool:
    """Triton kernels run here: a CUDA device, or CPU under the interpreter (TRITON_INTERPRET=1)."""
    from fdistill._triton_dispatch import interpreter_enabled, triton_available

    if not triton_available():
        return False
    return torch.device(device).type == "cuda" or interpreter_enabled()


def fmt(value, spec: str) -> str:
    """A cell: failures and None as they are ("OOM", "error", "skipped", "-"), numbers by ``spec``."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)
