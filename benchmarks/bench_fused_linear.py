"""Fused-linear distillation losses vs the materialised path (logits, then the loss), CPU or GPU.

    python -m benchmarks.bench_fused_linear                       # CPU: 4096 tokens, H 512, V 32000 fp32
    python -m benchmarks.bench_fused_linear --device cuda   # GPU: 8192 and 1024 tokens, H 4096, V 128256 bf16
    python -m benchmarks.bench_fused_linear --device cuda --tokens 1024
    python -m benchmarks.bench_fused_linear --dry-run --out /tmp/b   # CPU, tiny shapes: checks the script

Student and teacher are each given as an LM head (hidden states + weight, the teacher's frozen).
One forward+backward step of each implementation:

- ``materialised (fdistill)``: ``F.linear`` logits of both models, then ``fdistill.divergence_loss``
  (the fused row kernel): the strongest non-chunked path.
- ``materialised (eager)``: the same logits, then the divergence in eager PyTorch
  (``benchmarks/eager_divergences.py``).
- ``fused-linear (fdistill)``: ``fdistill.fused_linear_divergence_loss`` (default chunk size).
- ``liger fused-linear JSD`` (where Triton runs and liger-kernel imports): ``LigerFusedLinearJSD``
  with beta = 0 (forward KL), 1 (reverse KL) or 0.5 (JSD), fdistill's convention for ``jsd``.

Medians of --repeats runs after a warm-up (CPU) or over CUDA events (GPU, ``benchmarks/device_bench.py``);
peak memory is what the step adds above the inputs (CPU: resident-set high-water mark; GPU: max
allocated). Out of memory and other failures become "OOM" / "error" cells; past ``--budget-s`` the
rest are "skipped". The table is printed and written to ``--out`` (default ``$OUT``, else
``bench-out/``): ``fused_linear.md`` (``bench.md`` with ``--append``) and ``fused_linear.csv``.
Targets (issue 5): CPU peak <= 30% and time <= 1.2x of the materialised path; GPU peak <= 50% of
Liger's and time <= 1.0x of it.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import torch
from torch.nn import functional as F

import fdistill

from . import liger_baselines
from .bench_gpu import default_out
from .device_bench import FAILURES, Budget, Timer, fmt, free_memory, guarded, peak_bytes, triton_runs_on
from .eager_divergences import EAGER
from .harness import Report, environment_lines

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
MATERIALISED = "materialised (fdistill)"
HEADERS = ["tokens", "hidden", "vocab", "dtype", "divergence", "implementation", "loss", "fwd+bwd ms",
           "/ materialised", "/ liger", "peak MiB", "/ materialised", "/ liger"]  # fmt: skip


def make_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: no 2 GB host copies
    scale = 2.0 / hidden**0.5

    def draw(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device) * s).to(dtype)

    student_w = draw(vocab, hidden, s=scale).requires_grad_()
    student_h = draw(tokens, hidden).requires_grad_()
    teacher_w, teacher_h = draw(vocab, hidden, s=scale), draw(tokens, hidden)
    return student_h, student_w, teacher_h, teacher_w


def steps(inputs, divergence, with_liger):
    """{name: a function running one forward+backward step and returning the loss}."""
    sh, sw, th, tw = inputs

    def zero():
        sh.grad = sw.grad = None

    def materialised(loss_fn):
        def step():
            zero()
            with torch.no_grad():
                t = F.linear(th, tw)
            loss = loss_fn(F.linear(sh, sw), t)
            loss.backward()
            return loss

        return step

    def fused():
        zero()
        loss = fdistill.fused_linear_divergence_loss(
            sh, sw, teacher_hidden=th, teacher_weight=tw, divergence=divergence
        )
        loss.backward()
        return loss

    result = {
        MATERIALISED: materialised(lambda s, t: fdistill.divergence_loss(s, t, divergence)),
        "materialised (eager)": materialised(EAGER[divergence]),
        "fused-linear (fdistill)": fused,
    }
    liger = liger_baselines.fused_linear(divergence) if with_liger else None
    if liger is not None:

        def liger_step():
            zero()
            loss = liger(sh, sw, th, tw, None)  # shift_labels: positional in Liger 0.8
            loss.backward()
            return loss

        beta = liger_baselines.FUSED_LINEAR_BETA[divergence]
        result[f"liger fused-linear JSD (beta {beta:g})"] = liger_step
    return result


def measure(step, timer, device, budget, what):
    """(loss, seconds, peak bytes), a failure cell standing for each value from the first failure on."""
    loss = guarded(f"{what}: loss", lambda: float(step().detach()), budget)
    if loss in FAILURES:
        return loss, loss, loss
    ms = guarded(f"{what}: time", lambda: timer.ms(step), budget)
    if ms in FAILURES:
        return loss, ms, ms
    peak = guarded(f"{what}: peak", lambda: peak_bytes(step, device), budget)
    return loss, ms * 1e-3, peak


def ratio(value, base, spec):
    numbers = not any(v is None or isinstance(v, str) for v in (value, base))
    return format(value / base, spec) if numbers and base else "-"


def shape_rows(args, tokens, report, timer, budget) -> None:
    gpu = args.device == "cuda"
    dtype_name = str(args.dtype).removeprefix("torch.")
    lead = [str(tokens), str(args.hidden), str(args.vocab), dtype_name]
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    section = report.table(
        "fused_linear",
        f"Fused-linear losses, {tokens} tokens, H {args.hidden}, V {args.vocab}, {dtype_name}",
        HEADERS,
        [f"student + teacher heads, one forward+backward step; {where}; torch {torch.__version__}"],
    )
    make = lambda: make_inputs(tokens, args.hidden, args.vocab, args.dtype, args.device)  # noqa: E731
    inputs = guarded(f"fused-linear inputs at {tokens} tokens", make, budget)
    if isinstance(inputs, str):
        report.add(section, lead + ["all", "inputs"] + [inputs] * (len(HEADERS) - 6))
        return
    with_liger = triton_runs_on(args.device)
    if not with_liger:
        print("Liger rows skipped: Triton cannot run here (CPU without TRITON_INTERPRET=1)", flush=True)
    for divergence in args.divergences:
        named = steps(inputs, divergence, with_liger)
        results = {name: measure(step, timer, args.device, budget, f"{name} {divergence} at {tokens}")
                   for name, step in named.items()}  # fmt: skip
        _, base_t, base_m = results[MATERIALISED]
        liger = next((r for name, r in results.items() if name.startswith("liger")), (None, None, None))
        for name, (loss, seconds, peak) in results.items():
            mib = peak if peak is None or isinstance(peak, str) else peak / 2**20
            ms = seconds if isinstance(seconds, str) else seconds * 1e3
            report.add(section, lead + [
                divergence, name, fmt(loss, ".6g"), fmt(ms, ".1f"),
                ratio(seconds, base_t, ".2f"), ratio(seconds, liger[1], ".2f"),
                fmt(mib, ".0f"), ratio(peak, base_m, ".0%"), ratio(peak, liger[2], ".0%"),
            ])  # fmt: skip
        free_memory()
    report.print_table(section)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="CPU: timed runs after one warm-up")
    p.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=fdistill.DIVERGENCES)
    p.add_argument("--out", default=default_out(), help="output folder (default $OUT, else bench-out)")
    p.add_argument("--append", action="store_true", help="add to bench.md and fused_linear.csv in --out")
    p.add_argument("--budget-s", type=float, help="past this many seconds, the remaining cells are skipped")
    p.add_argument("--rep-ms", type=float, default=100.0, help="GPU: timed calls per measurement, in ms")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the script without a GPU")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.threads, args.repeats = "cpu", 1, 1
    gpu = args.device == "cuda"
    small = args.dry_run
    args.tokens = args.tokens or ([8, 4] if small else [8192, 1024] if gpu else [4096])
    args.hidden = args.hidden or (16 if small else 4096 if gpu else 512)
    args.vocab = args.vocab or (256 if small else 128256 if gpu else 32000)
    dtype = args.dtype or ("bf16" if gpu or small else "fp32")  # dry runs mirror the GPU's dtype
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU (or --dry-run)")
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        timer = Timer("cuda", rep_ms=args.rep_ms)
    else:
        timer = Timer("cpu", cpu_warmup=0 if args.dry_run else 1, cpu_reps=args.repeats)
    budget = Budget(args.budget_s)
    preamble = environment_lines()
    for line in preamble:
        print(line, flush=True)
    md = "bench.md" if args.append else "fused_linear.md"
    report = Report(args.out, md, preamble, append=args.append)
    gc.freeze()  # what is loaded so far is never garbage: every gc.collect below stays cheap
    try:
        for tokens in args.tokens:
            try:
                shape_rows(args, tokens, report, timer, budget)
            except Exception:  # a bug at one shape must not lose the others
                print(f"error: fused-linear table at {tokens} tokens:", flush=True)
                traceback.print_exc()
            free_memory()
    finally:
        gc.unfreeze()  # frozen objects would outlive the interpreter's shutdown (nanobind leak reports)
    print(f"bench_fused_linear: {time.perf_counter() - start:.1f} s; tables in {report.md_path} and "
          f"{report.out / 'fused_linear.csv'}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
