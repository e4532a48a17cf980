"""fdistill.trainer.parallel: tasks in spawned workers, results in order, their log lines relayed, their
failures raised here (an exception as itself, a dead worker as one clear error)."""

from __future__ import annotations

import os

import pytest

from fdistill.trainer.parallel import available_cpus, check_jobs, default_jobs, run_tasks


def _square(x, *, log):
    log(f"got {x}")
    return x * x


def _fail(x, *, log):
    raise ValueError(f"bad task {x}")


def _die(x, *, log):
    os._exit(3)


@pytest.mark.parametrize("jobs", [1, 2])
def test_results_in_task_order_and_log_lines(jobs):
    lines = []
    assert run_tasks(_square, [(1,), (2,), (3,)], ["a", "b", "c"], jobs=jobs, log=lines.append) == [1, 4, 9]
    expected = (
        {"a", "got 1", "b", "got 2", "c", "got 3"} if jobs == 1 else {"[a] got 1", "[b] got 2", "[c] got 3"}
    )
    assert set(lines) == expected


def test_a_task_error_is_raised_as_itself():
    with pytest.raises(ValueError, match="bad task"):
        run_tasks(_fail, [(1,), (2,)], ["a", "b"], jobs=2, log=lambda *_: None)


def test_a_dead_worker_is_one_clear_error():
    with pytest.raises(RuntimeError, match="a worker process died"):
        run_tasks(_die, [(1,), (2,)], ["a", "b"], jobs=2, log=lambda *_: None)


def test_jobs_checks_and_defaults():
    for bad in (0, -2, 1.0, True, None):
        with pytest.raises(ValueError, match="jobs must be an int >= 1"):
            check_jobs(bad)
    assert default_jobs(1, 1) == 1 and default_jobs(100, 10**6) == 1
    assert default_jobs(100, 1) == available_cpus() >= 1
