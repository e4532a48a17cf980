"""Independent runs (one per seed) in parallel processes.

Each seed's pipeline draws everything from its own seed and writes only its own checkpoints, and its
results are bitwise reproducible for a fixed torch thread count; so ``jobs`` worker processes, each
on the parent's thread count, give the same bytes as one process running the seeds in turn.

Workers are *spawned* (a forked copy of a process that has run OpenMP can deadlock), forward their log
lines to the parent through a queue, and exit when the parent dies (``kill -9`` included: the
Linux parent-death signal, and a watchdog elsewhere), so a rerun never races an orphan."""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

_queue = None  # a worker's line to the parent's log (set by _start_worker)
_WATCH_SECONDS = 0.5  # how often a worker checks that its parent is alive, where no signal tells it


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(tasks: int, threads: int) -> int:
    """As many workers as tasks, up to the CPUs available at ``threads`` each (at least 1)."""
    return max(1, min(tasks, available_cpus() // max(threads, 1)))


def check_jobs(jobs) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    return jobs


def spawns(jobs: int, tasks: int) -> bool:
    """Whether :func:`run_tasks` runs ``tasks`` tasks in worker processes at ``jobs`` (then the tasks get
    no progress bars, and what they take must pickle)."""
    return jobs > 1 and tasks > 1


def run_tasks(fn: Callable, tasks: Sequence[tuple], labels: Sequence[str], *, jobs: int, log) -> list:
    """``fn(*task, log=...)`` for every task; returns the results in task order.

    ``jobs == 1`` (or one task): in this process, in turn, logging each label and then the task's lines
    to ``log``. Otherwise ``jobs`` spawned processes at this process's torch thread count: ``fn`` must
    be a module-level function and the tasks picklable, and a script must call this under
    ``if __name__ == "__main__":`` (spawned workers import the main module). Each worker's log lines
    reach ``log`` prefixed with the task's label. The first task to fail raises its exception here (the
    others are cancelled)."""
    if not spawns(check_jobs(jobs), len(tasks)):
        results = []
        for task, label in zip(tasks, labels, strict=True):
            log(label)
            results.append(fn(*task, log=log))
        return results
    import torch

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    relay = threading.Thread(target=_relay, args=(queue, log), daemon=True)
    relay.start()
    pool = futures.ProcessPoolExecutor(
        min(jobs, len(tasks)),
        mp_context=ctx,
        initializer=_start_worker,
        initargs=(os.getpid(), torch.get_num_threads(), queue),
    )
    try:
        running = [pool.submit(fn, *task, log=_Log(label)) for task, label in zip(tasks, labels, strict=True)]
        results = [f.result() for f in running]
    except futures.process.BrokenProcessPool as exc:
        pool.shutdown(wait=False, cancel_futures=True)
        raise RuntimeError(
            "a worker process died (killed, out of memory, or it could not start: a script that runs "
            "several jobs must do so under `if __name__ == '__main__':`, since spawned workers import the "
            "main module); rerun to resume, or use jobs=1"
        ) from exc
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    queue.put(None)  # after every worker has exited: the relay has seen all their lines
    relay.join()
    return results


class _Log:
    """A worker's ``log``: the line, prefixed with its task's label, to the parent."""

    def __init__(self, label: str):
        self.label = label

    def __call__(self, *parts) -> None:
        _queue.put(f"[{self.label}] " + " ".join(str(p) for p in parts))


def _relay(queue, log) -> None:
    while (line := queue.get()) is not None:
        log(line)


def _start_worker(parent: int, threads: int, queue) -> None:
    global _queue
    _queue = queue
    import torch

    torch.set_num_threads(threads)
    try:  # Linux: the kernel kills this worker when the parent dies
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:  # also catches a parent that died before the signal was set
        time.sleep(_WATCH_SECONDS)
    os._exit(1)
