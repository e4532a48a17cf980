"""``python -m fdistill <experiment> ...``: the trainer's experiments.

python -m fdistill teacher-hacking --preset tiny [--out runs/teacher-hacking-tiny] [--seeds 0,1,2]
    [--divergence forward_kl] [--fused] [--fresh] [--no-progress] [--no-plots] [--threads 1] [--jobs N]
python -m fdistill rlhf --method {rl,warp,bond,warm,irl} --preset tiny [--out runs/rlhf-<method>-<preset>]
    [--seeds 0,1,2] [--fresh] [--no-progress] [--no-plots] [--threads 1] [--jobs N]

teacher-hacking also runs data parallel on the CPU: ``torchrun --nproc_per_node N -m fdistill
teacher-hacking ...`` (gloo; the preset's batch must divide by N; rank 0 writes and logs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fdistill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="experiment", required=True)
    th = sub.add_parser("teacher-hacking", help="oracle -> teacher -> student, offline vs online data")
    th.add_argument("--preset", default="tiny", help="tiny (4 seeds, ~5 min on 2 cores), small, smoke (CI)")
    th.add_argument("--out", default=None, help="output directory (default runs/teacher-hacking-<preset>)")
    _seed_flags(th)
    th.add_argument("--divergence", default="forward_kl", help="any fdistill divergence, or 'fy'")
    th.add_argument("--fused", action="store_true", help="use the fused-linear loss from hidden states")
    th.add_argument("--fresh", action="store_true", help="delete the output directory's previous run first")
    th.add_argument("--no-progress", action="store_true")
    th.add_argument("--no-plots", action="store_true")
    _process_flags(th)
    rl = sub.add_parser("rlhf", help="RL / WARP / BOND / WARM / IRL on a task with a known true reward")
    rl.add_argument("--method", required=True, help="rl, warp, bond, warm or irl")
    rl.add_argument("--preset", default="tiny", help="tiny (3 seeds, 2-7 min on 2 cores) or smoke (CI)")
    rl.add_argument("--out", default=None, help="output directory (default runs/rlhf-<method>-<preset>)")
    _seed_flags(rl)
    rl.add_argument("--fresh", action="store_true", help="delete the output directory's previous run first")
    rl.add_argument("--no-progress", action="store_true")
    rl.add_argument("--no-plots", action="store_true")
    _process_flags(rl)
    args = p.parse_args(argv)

    from .trainer import distributed
    from .trainer.checkpoint import CheckpointError
    from .trainer.extras import MissingExtraError, require_for_run
    from .trainer.rundir import check_out_dir

    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        plan = _teacher_hacking if args.experiment == "teacher-hacking" else _rlhf
        out, run = plan(args)  # everything is validated before --fresh deletes anything
        require_for_run(progress=not args.no_progress, plots=not args.no_plots)
        check_out_dir(out)
        distributed.init_from_env()
        if args.fresh and distributed.is_main() and Path(out).is_dir():
            shutil.rmtree(out)
        with _threads(args.threads):
            run()
    except (ValueError, CheckpointError, MissingExtraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up, or the directory became read-only, mid-run
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _seed_flags(parser) -> None:
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, one run each (default: the preset's)",
    )
    seeds.add_argument("--seed", type=int, default=None, help="one seed (the same as --seeds N)")


def _process_flags(parser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny models, more threads contend)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=None,
                        help="seeds run at a time, in worker processes of --threads each (default: as many "
                             "as the CPUs allow; the curves are the same bytes for any --jobs)")  # fmt: skip


def _jobs(args, seeds, preset_seeds) -> int:
    """``--jobs``, or by default as many seeds at a time as the CPUs allow at ``--threads`` each (1 under
    ``torchrun``, where every rank is already a process)."""
    from .trainer.parallel import default_jobs

    if args.jobs is not None:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        return args.jobs
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1
    return default_jobs(len(seeds or preset_seeds), args.threads)


def _seed_list(args):
    """The seeds the flags ask for; None for the preset's."""
    return _seeds(args.seeds) if args.seeds is not None else None if args.seed is None else (args.seed,)


def _teacher_hacking(args):
    from .trainer.distill import LOSSES
    from .trainer.experiment import preset_config, run_teacher_hacking

    cfg = preset_config(args.preset)
    if args.divergence not in LOSSES:
        raise ValueError(f"unknown divergence {args.divergence!r}; choose one of {list(LOSSES)}")
    seeds = _seed_list(args)
    out = args.out or f"runs/teacher-hacking-{args.preset}"
    jobs = _jobs(args, seeds, cfg.seeds)
    return out, lambda: run_teacher_hacking(
        args.preset, out, seeds=seeds, divergence=args.divergence, fused=args.fused, jobs=jobs,
        progress=not args.no_progress, plots=not args.no_plots,
    )  # fmt: skip


def _seeds(text: str) -> tuple:
    """``--seeds 0,1,2`` as a tuple of ints."""
    from .trainer.report import check_seeds

    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    try:
        return check_seeds(seeds)
    except ValueError as exc:
        raise ValueError(f"--seeds: {exc}") from None


def _rlhf(args):
    from .trainer.rlhf.experiment import METHODS, preset_config, run_rlhf

    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose one of {list(METHODS)}")
    cfg = preset_config(args.preset)
    seeds = _seed_list(args)
    out = args.out or f"runs/rlhf-{args.method}-{args.preset}"
    jobs = _jobs(args, seeds, cfg.seeds)
    return out, lambda: run_rlhf(
        args.method, args.preset, out, seeds=seeds, jobs=jobs, progress=not args.no_progress,
        plots=not args.no_plots,
    )  # fmt: skip


@contextlib.contextmanager
def _threads(n: int):
    """torch's CPU thread count set to ``n`` for the block (results are bitwise reproducible for a fixed
    ``n``; the tiny models run fastest on one thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    sys.exit(main())
