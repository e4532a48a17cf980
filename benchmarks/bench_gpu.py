"""GPU benchmark: fdistill's Triton kernels vs eager PyTorch, torch.compile and Liger-Kernel.

    python -m benchmarks.bench_gpu                          # BT = 8192 and 1024 tokens, V = 128256, bf16
    python -m benchmarks.bench_gpu --tokens 1024 --divergences forward_kl --impls triton,eager
    python -m benchmarks.bench_gpu --dry-run --out /tmp/b   # CPU, tiny shapes: checks the script

Run by ``benchmarks/gpu_check.sh bench``. Tables are printed and written to ``--out`` (default
``$OUT``, else ``bench-out/``): ``bench.md`` (every table) and one CSV per table (``divergence.csv``,
``fdiv.csv``), rewritten after every row.

Divergence table, for every divergence in ``fdistill.DIVERGENCES``: the loss value (the
implementations must agree), the median time of the forward (no gradient) and of forward+backward,
the peak memory forward+backward allocates beyond its inputs, and the fraction of the memory floor
achieved: the bytes that must move (forward: student and teacher read once; forward+backward: also
the gradient written once) at the device-to-device copy bandwidth measured in the same run.
Implementations (``--impls``):

- ``triton``, ``triton_inplace``: ``fdistill.divergence_loss(backend="triton")``, the latter with
  ``grad_in_place=True``. That backward overwrites the student logits with their gradient, so its
  logits are restored from a saved copy before every timed call, outside the timed region;
- ``eager``: the formulas users write (``benchmarks/eager_divergences.py``: float32 log_softmax,
  ``F.kl_div``);
- ``compile``: ``torch.compile`` of the same formulas (``dynamic=False``), compiled and warmed before
  timing; "compile s" is the time of the first forward and forward+backward (the compiles). Only at
  ``--compile-tokens`` (default: the first ``--tokens``): another shape is another compile;
- ``liger``, ``liger_kernel``: Liger-Kernel where it has the divergence (``LigerKLDIVLoss``: forward
  KL; ``LigerJSD`` beta = 1: reverse KL, 0.5: JSD; ``LigerTVDLoss``: TV) on bf16 log-softmax (TV:
  softmax) of the logits, included in the time (a training step computes it), or precomputed
  ("kernel only"). Dropped, with one line saying why, when Liger does not import.

f-divergence table: ``f_softargmax`` and ``fy_loss`` (labels and probability targets) with the
Triton and CUDA backends against ``torch.softmax`` and ``F.cross_entropy``.

Times: medians over CUDA events (``benchmarks/device_bench.py``), ``--rep-ms`` of timed calls
each; a failure (OOM included) becomes the cell "OOM" / "error" and the run goes on; past
``--budget-s`` the remaining cells are "skipped". ``--dry-run``: the same tables on CPU with tiny
shapes (Triton under ``TRITON_INTERPRET=1``, else skipped; the CUDA backend skipped; torch.compile
with the "eager" backend, i.e. dynamo only), for checking the script without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fdistill

from . import liger_baselines
from .device_bench import (
    FAILURES,
    Budget,
    Timer,
    copy_bandwidth,
    fmt,
    free_memory,
    guarded,
    peak_bytes,
    synchronize,
    triton_runs_on,
)
from .eager_divergences import EAGER
from .harness import Report, environment_lines

IMPLS = ("triton", "triton_inplace", "eager", "liger", "liger_kernel", "compile")
SECTIONS = ("divergence", "fdiv")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DIVERGENCE_HEADERS = ["tokens", "vocab", "dtype", "divergence", "impl", "loss", "fwd ms", "fwd % floor",
                      "fwd+bwd ms", "fwd+bwd % floor", "peak GB", "compile s"]  # fmt: skip
FDIV_HEADERS = ["tokens", "vocab", "dtype", "operator", "backend", "target", "pass", "ms", "/ softmax",
                "% floor", "peak GB"]  # fmt: skip


def default_out() -> str:
    return os.environ.get("OUT") or "bench-out"


@dataclass
class Impl:
    label: str
    fn: Callable  # (student, teacher) -> scalar loss
    inputs: Callable | None = None  # (student, teacher) -> what fn takes instead (untimed)
    in_place: bool = False  # fn's backward overwrites its student argument
    compile: bool = False  # the first calls compile


class Run:
    """What the sections share: device, dtype, timer, budget, report, the measured bandwidth."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.dtype = DTYPES[args.dtype]
        self.dtype_name = args.dtype
        if args.dry_run:
            self.timer = Timer(self.device)
        else:
            self.timer = Timer(self.device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        self.budget = Budget(args.budget_s)
        self.triton = triton_runs_on(self.device)
        preamble = environment_lines() + [f"bench_gpu {' '.join(args.argv)}".rstrip()]
        for line in preamble:
            print(line, flush=True)
        self.report = Report(args.out, "bench.md", preamble, append=args.append)
        self._notes_done = set()

    def note_once(self, key: str, line: str) -> None:
        if key not in self._notes_done:
            self._notes_done.add(key)
            print(line, flush=True)

    @functools.cached_property
    def bandwidth(self) -> float:
        return copy_bandwidth(self.timer, 2**30 if self.device.type == "cuda" else 2**24)

    def logits(self, tokens: int, scale: float, seed: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(tokens, self.args.vocab, generator=g, device=self.device)
        return (x * scale).to(self.dtype)


# ---------------------------------------------------------------------------- divergence table


@functools.cache
def compiled(divergence: str, backend: str):
    """One torch.compile wrapper per divergence, reused across shapes (each shape compiles once)."""
    return torch.compile(EAGER[divergence], backend=backend, dynamic=False)


def divergence_impls(run: Run, divergence: str, tokens: int):
    """The implementations of ``--impls`` that can run here, in table order."""
    wanted = run.args.impls
    if not run.triton and {"triton", "triton_inplace", "liger", "liger_kernel"} & set(wanted):
        run.note_once("triton", "Triton cannot run here (CPU without TRITON_INTERPRET=1): Triton and "
                      "Liger rows skipped")  # fmt: skip
    if run.triton and "triton" in wanted:
        fused = lambda s, t: fdistill.divergence_loss(s, t, divergence, backend="triton")  # noqa: E731
        yield Impl("fdistill triton", fused)
    if run.triton and "triton_inplace" in wanted:
        yield Impl(
            "fdistill triton, grad in place",
            lambda s, t: fdistill.divergence_loss(s, t, divergence, backend="triton", grad_in_place=True),
            in_place=True,
        )
    if "eager" in wanted:
        yield Impl("eager (fp32 log_softmax)", EAGER[divergence])
    wants_liger = run.triton and {"liger", "liger_kernel"} & set(wanted)
    liger = liger_baselines.loss_on_distributions(divergence) if wants_liger else None
    if liger is not None:
        loss, takes_probs = liger
        prepare = (lambda x: x.softmax(-1)) if takes_probs else (lambda x: x.log_softmax(-1))
        if "liger" in wanted:
            label = f"liger (with {'softmax' if takes_probs else 'log_softmax'})"
            yield Impl(label, lambda s, t: loss(prepare(s), prepare(t)))
        if "liger_kernel" in wanted:
            yield Impl("liger kernel only", loss, inputs=lambda s, t: (prepare(s), prepare(t)))
    if "compile" in wanted:
        if tokens in run.args.compile_tokens:
            backend = run.args.compile_backend
            yield Impl(f"torch.compile ({backend})", compiled(divergence, backend), compile=True)
        else:
            run.note_once(f"compile{tokens}", f"torch.compile rows skipped at {tokens} tokens (not in "
                          "--compile-tokens: another shape is another compile)")  # fmt: skip


def measure(run: Run, impl: Impl, student, teacher) -> dict:
    """{"compile s", "loss", "fwd ms", "fwd+bwd ms", "peak"}: values, or the failure of the first step
    that failed for it and every later step (an OOM forward is an OOM backward too)."""
    what = f"{impl.label} at {tuple(student.shape)}"
    state = {}

    def prepare():
        s, t = impl.inputs(student, teacher) if impl.inputs else (student, teacher)
        state.update(s=s, t=t, x=s.detach().clone().requires_grad_())

    def forward():
        with torch.no_grad():
            return impl.fn(state["s"], state["t"])

    def forward_backward():
        impl.fn(state["x"], state["t"]).backward()
        state["x"].grad = None

    def restore():  # grad_in_place wrote the gradient over x: the next call needs the logits again
        with torch.no_grad():
            state["x"].copy_(state["s"])

    setup = restore if impl.in_place else None

    def first_calls():
        start = time.perf_counter()
        forward()
        forward_backward()
        synchronize(run.device)
        return time.perf_counter() - start

    steps = {
        "compile s": first_calls if impl.compile else None,
        "loss": lambda: float(forward()),
        "fwd ms": lambda: run.timer.ms(forward),
        "fwd+bwd ms": lambda: run.timer.ms(forward_backward, setup),
        "peak": lambda: peak_bytes(forward_backward, run.device, setup),
    }
    failure = guarded(f"{what}: inputs", prepare, run.budget)
    results = {}
    for name, step in steps.items():
        if step is None:
            results[name] = None
        elif failure is not None:
            results[name] = failure
        else:
            results[name] = guarded(f"{what}: {name}", step, run.budget)
            if results[name] in FAILURES:
                failure = results[name]
    state.clear()
    free_memory()
    return results


def percent_of(floor_ms: float, ms) -> str:
    return ms if isinstance(ms, str) else f"{100 * floor_ms / ms:.0f}%"


def gigabytes(value) -> str:
    return fmt(value if value is None or isinstance(value, str) else value / 1e9, ".2f")


def divergence_section(run: Run, tokens: int) -> None:
    args = run.args
    lead = [str(tokens), str(args.vocab), run.dtype_name]
    nbytes = tokens * args.vocab * run.dtype.itemsize
    bandwidth = guarded("copy bandwidth", lambda: run.bandwidth, run.budget)
    clock = "CUDA events" if run.device.type == "cuda" else "perf_counter"
    notes = [f"{run.device.type}; medians of {clock} around the loss (and backward) call alone"]
    if not isinstance(bandwidth, str):
        floors = (2 * nbytes / bandwidth * 1e3, 3 * nbytes / bandwidth * 1e3)
        notes.append(
            f"memory floor: forward {2 * nbytes / 1e9:.2f} GB = {floors[0]:.3f} ms, forward+backward "
            f"{3 * nbytes / 1e9:.2f} GB = {floors[1]:.3f} ms at the measured copy bandwidth "
            f"{bandwidth / 1e12:.3f} TB/s"
        )
    else:
        floors = None
    title = f"Divergences, {tokens} x {args.vocab} {run.dtype_name}"
    if args.impls == ["compile"]:
        title += ", torch.compile"
    section = run.report.table("divergence", title, DIVERGENCE_HEADERS, notes)
    make = lambda: (run.logits(tokens, 2.0, 0), run.logits(tokens, 2.0, 1))  # noqa: E731
    inputs = guarded(f"logits {tokens} x {args.vocab}", make, run.budget)
    if isinstance(inputs, str):
        run.report.add(section, lead + ["all", "inputs"] + [inputs] * (len(DIVERGENCE_HEADERS) - 5))
        return
    student, teacher = inputs
    for divergence in args.divergences:
        for impl in divergence_impls(run, divergence, tokens):
            r = measure(run, impl, student, teacher)
            fwd, full = r["fwd ms"], r["fwd+bwd ms"]
            run.report.add(section, lead + [
                divergence, impl.label, fmt(r["loss"], ".6g"),
                fmt(fwd, ".3f"), percent_of(floors[0], fwd) if floors else "-",
                fmt(full, ".3f"), percent_of(floors[1], full) if floors else "-",
                gigabytes(r["peak"]), fmt(r["compile s"], ".1f"),
            ])  # fmt: skip
    run.report.print_table(section)


# ---------------------------------------------------------------------------- f-divergence table


def fdiv_backends(run: Run) -> list[str]:
    backends = []
    if run.triton:
        backends.append("triton")
    else:
        run.note_once("fdiv-triton", "f-divergence Triton rows skipped (CPU without TRITON_INTERPRET=1)")
    if run.device.type == "cuda" and fdistill.has_cuda_kernels():
        backends.append("cuda")
    else:
        run.note_once("fdiv-cuda", f"f-divergence CUDA backend rows skipped ({run.device.type}, CUDA "
                      f"kernels built: {fdistill.has_cuda_kernels()})")  # fmt: skip
    return backends


def fdiv_section(run: Run, tokens: int) -> None:
    args = run.args
    lead = [str(tokens), str(args.vocab), run.dtype_name]
    nbytes = tokens * args.vocab * run.dtype.itemsize
    section = run.report.table(
        "fdiv", f"f-divergence operators, {tokens} x {args.vocab} {run.dtype_name}", FDIV_HEADERS,
        ["alpha 1.5 unless named; targets: issue 4, f_softargmax <= 3x softmax, fy_loss fwd+bwd <= 4x"],
    )  # fmt: skip

    def inputs():
        logits = run.logits(tokens, 4.0, 2)
        g = torch.Generator(device=run.device).manual_seed(3)
        labels = torch.randint(0, args.vocab, (tokens,), generator=g, device=run.device)
        probs = torch.softmax(run.logits(tokens, 2.0, 4).float(), -1).to(run.dtype)
        return logits, labels, probs, logits.detach().clone().requires_grad_()

    made = guarded(f"fdiv inputs {tokens} x {args.vocab}", inputs, run.budget)
    if isinstance(made, str):
        run.report.add(section, lead + ["all", "-", "-", "inputs"] + [made] * (len(FDIV_HEADERS) - 7))
        return
    logits, labels, probs, x = made

    def step(loss_fn, target):
        def run_step():
            loss_fn(x, target).backward()
            x.grad = None

        return run_step

    cases = [  # operator, backend, target, pass, fn, bytes that must move
        ("softmax (torch)", "-", "-", "fwd", lambda: torch.softmax(logits, -1), 2),
        ("cross_entropy (torch)", "-", "labels", "fwd+bwd", step(F.cross_entropy, labels), 2),
        ("cross_entropy (torch)", "-", "probs", "fwd+bwd", step(F.cross_entropy, probs), 3),
    ]
    for backend in fdiv_backends(run):
        for f, alpha in (("alpha", 1.5), ("alpha", 2.0), ("js", 1.5)):
            name = f"f_softargmax ({f} {alpha})" if f == "alpha" else f"f_softargmax ({f})"
            fn = functools.partial(fdistill.f_softargmax, logits, f, alpha=alpha, backend=backend)
            cases.append((name, backend, "-", "fwd", fn, 2))
        for target, tensor, moved in (("labels", labels, 2), ("probs", probs, 3)):
            fy = functools.partial(fdistill.fy_loss, f="alpha", alpha=1.5, backend=backend)
            cases.append(("fy_loss", backend, target, "fwd+bwd", step(fy, tensor), moved))
    softmax_ms = None
    bandwidth = guarded("copy bandwidth", lambda: run.bandwidth, run.budget)
    for operator, backend, target, kind, fn, moved in cases:
        what = f"{operator} {backend} {target} at {tokens}"
        ms = guarded(what, lambda fn=fn: run.timer.ms(fn), run.budget)
        peak = ms if ms in FAILURES else guarded(f"{what}: peak", lambda fn=fn: peak_bytes(fn, run.device))
        if operator.startswith("softmax") and not isinstance(ms, str):
            softmax_ms = ms
        ratio = "-" if softmax_ms is None or isinstance(ms, str) else f"{ms / softmax_ms:.1f}x"
        floor = "-" if isinstance(bandwidth, str) else percent_of(moved * nbytes / bandwidth * 1e3, ms)
        row = lead + [operator, backend, target, kind, fmt(ms, ".3f"), ratio, floor, gigabytes(peak)]
        run.report.add(section, row)
    run.report.print_table(section)


# ---------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", help="token counts (default 8192 1024; dry run 2 1)")
    p.add_argument("--vocab", type=int, help="default 128256 (dry run 256)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--divergences", default=",".join(fdistill.DIVERGENCES), help="comma-separated")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {','.join(IMPLS)}")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--compile-tokens", type=int, nargs="*", help="where the torch.compile rows run "
                   "(default: the first --tokens)")  # fmt: skip
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; dry run eager)")
    p.add_argument("--out", default=default_out(), help="output folder (default $OUT, else bench-out)")
    p.add_argument("--append", action="store_true", help="add to bench.md and the CSVs already in --out")
    p.add_argument("--budget-s", type=float, help="past this many seconds, the remaining cells are skipped")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed calls per measurement, in ms")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the script without a GPU")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    args.tokens = args.tokens or ([2, 1] if args.dry_run else [8192, 1024])
    args.vocab = args.vocab or (256 if args.dry_run else 128256)
    args.compile_tokens = args.tokens[:1] if args.compile_tokens is None else args.compile_tokens
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    for name, allowed in (("divergences", fdistill.DIVERGENCES), ("impls", IMPLS), ("sections", SECTIONS)):
        values = [v for v in getattr(args, name).split(",") if v]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            p.error(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
        setattr(args, name, values)
    return args


def main(argv=None) -> None:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU (or --dry-run)")
    start = time.perf_counter()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: threads only contend with the other processes
    run = Run(args)
    sections = {"divergence": divergence_section, "fdiv": fdiv_section}
    gc.freeze()  # what is loaded so far is never garbage: every gc.collect below stays cheap
    try:
        for tokens in args.tokens:
            for name in args.sections:
                t0 = time.perf_counter()
                try:
                    sections[name](run, tokens)
                except Exception:  # a bug in one section must not lose the others
                    print(f"error: section {name} at {tokens} tokens:", flush=True)
                    traceback.print_exc()
                free_memory()
                print(f"[{name} at {tokens} tokens: {time.perf_counter() - t0:.1f} s]", flush=True)
    finally:
        gc.unfreeze()  # frozen objects would outlive the interpreter's shutdown (nanobind leak reports)
    print(f"bench_gpu: {time.perf_counter() - start:.1f} s; tables in {run.report.md_path} and "
          f"{', '.join(sorted({s['name'] + '.csv' for s in run.report.sections}))}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
