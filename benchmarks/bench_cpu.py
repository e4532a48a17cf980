"""Fused CPU kernel vs eager PyTorch for every divergence: time and peak memory.

    python -m benchmarks.bench_cpu                       # 2048 x 32000, fp32 and bf16, 2 threads
    python -m benchmarks.bench_cpu --tokens 256 --vocab 4096 --repeats 1   # a quick look

Columns, all measured in one run on the same tensors: "softmax" is the yardstick, one ``torch.softmax``
of the student logits (one read, one write of tokens x V); "fused" is ``fdistill.divergence_loss``
(backend="cpu": the one-pass kernel when the student needs a gradient); "x softmax" is fused
forward+backward over that yardstick; "in place" is ``grad_in_place=True`` (two passes, the gradient
written over the logits); "eager" is the plain formula a user writes (``benchmarks/eager_divergences.py``:
``log_softmax`` in float32, ``F.kl_div``, ``logaddexp``), and "compile" the same formula through
``torch.compile`` (inductor, compiled in the untimed warm-up). "vs eager" / "vs compile" are their
forward+backward times over fused. Times are medians of --repeats runs after one warm-up. Peak memory
is what a forward+backward adds to the resident set on top of the inputs (the gradient alone is
tokens x V x itemsize, "grad MB").
"""

from __future__ import annotations

import argparse
import platform

import torch

import fdistill
from benchmarks.eager_divergences import EAGER
from benchmarks.harness import format_table, median_seconds, peak_memory_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_in_place(loss_fn, student, teacher, repeats):
    """forward+backward with the gradient written over a copy of the logits (copy not timed)."""
    buffer = student.clone()

    def forward_backward():
        loss_fn(buffer.detach().requires_grad_(), teacher).backward()

    return median_seconds(forward_backward, repeats)


def measure(loss_fn, student, teacher, repeats):
    x = student.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            loss_fn(student, teacher)

    def forward_backward():
        loss_fn(x, teacher).backward()
        x.grad = None

    return (
        median_seconds(forward, repeats),
        median_seconds(forward_backward, repeats),
        peak_memory_bytes(forward_backward),
    )


def softmax_seconds(x: torch.Tensor, repeats: int) -> float:
    """The yardstick: one ``torch.softmax`` of a tensor of the same shape and dtype (one read, one write)."""
    return median_seconds(lambda: torch.softmax(x, -1), repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--divergences", default=",".join(fdistill.DIVERGENCES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-in-place", action="store_true", help="skip the grad_in_place=True column")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    headers = ["divergence", "dtype", "softmax", "fused fwd", "fused fwd+bwd", "x softmax",
               "fused in place", "eager fwd+bwd", "compile fwd+bwd", "vs eager", "vs compile",
               "fused peak MB", "grad MB"]  # fmt: skip
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        student = (torch.randn(args.tokens, args.vocab) * 2).to(dtype)
        teacher = (torch.randn(args.tokens, args.vocab) * 2).to(dtype)
        grad_mb = student.numel() * student.element_size() / 2**20
        for divergence in args.divergences.split(","):
            fused = lambda s, t, d=divergence: fdistill.divergence_loss(s, t, d, backend="cpu")  # noqa: E731
            plain = EAGER[divergence]  # the formula a user writes, on log_softmax
            f_fwd, f_full, f_mem = measure(fused, student, teacher, args.repeats)
            f_in_place = None
            if not args.no_in_place:
                in_place = lambda s, t, d=divergence: fdistill.divergence_loss(  # noqa: E731
                    s, t, d, backend="cpu", grad_in_place=True
                )
                f_in_place = measure_in_place(in_place, student, teacher, args.repeats)
            _, e_full, _ = measure(plain, student, teacher, args.repeats)
            c_full = None
            if not args.no_compile:
                torch._dynamo.reset()
                compiled = torch.compile(plain, dynamic=False)  # inductor; compiled in measure's warm-up
                _, c_full, _ = measure(compiled, student, teacher, args.repeats)
            sm = softmax_seconds(student, args.repeats)  # after the others: same state of the machine
            ms = lambda x: "n/a" if x is None else f"{x * 1e3:.1f} ms"  # noqa: E731
            rows.append([
                divergence, dname, ms(sm), ms(f_fwd), ms(f_full), f"{f_full / sm:.2f}x", ms(f_in_place),
                ms(e_full), ms(c_full), f"{e_full / f_full:.1f}x",
                "n/a" if c_full is None else f"{c_full / f_full:.2f}x",
                f"{f_mem / 2**20:.0f}" if f_mem is not None else "n/a", f"{grad_mb:.0f}",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)

    print()
    print(
        f"fdistill {fdistill.__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{args.threads} threads, CPU kernels: {fdistill.cpu_capability()}, "
        f"{args.tokens} tokens x V={args.vocab}, median of {args.repeats}"
    )
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
