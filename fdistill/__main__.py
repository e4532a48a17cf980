"""``python -m fdistill <experiment> ...``: the trainer's experiments.

python -m fdistill teacher-hacking --preset tiny [--out runs/teacher-hacking-tiny] [--seed 0]
    [--divergence forward_kl] [--fused] [--fresh] [--no-progress]
"""

from __future__ import annotations

import argparse
import shutil
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fdistill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="experiment", required=True)
    th = sub.add_parser("teacher-hacking", help="oracle -> teacher -> student, offline vs online data")
    th.add_argument("--preset", default="tiny", help="tiny (< 10 min on 2 cores), small, or smoke (CI)")
    th.add_argument("--out", default=None, help="output directory (default runs/teacher-hacking-<preset>)")
    th.add_argument("--seed", type=int, default=0)
    th.add_argument("--divergence", default="forward_kl", help="any fdistill divergence, or 'fy'")
    th.add_argument("--fused", action="store_true", help="use the fused-linear loss from hidden states")
    th.add_argument("--fresh", action="store_true", help="delete the output directory's previous run first")
    th.add_argument("--no-progress", action="store_true")
    th.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)

    from .trainer.checkpoint import CheckpointError
    from .trainer.experiment import run_teacher_hacking

    out = args.out or f"runs/teacher-hacking-{args.preset}"
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    try:
        run_teacher_hacking(args.preset, out, seed=args.seed, divergence=args.divergence, fused=args.fused,
                            progress=not args.no_progress, plots=not args.no_plots)  # fmt: skip
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
