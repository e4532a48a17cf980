"""Fused CPU kernel vs eager PyTorch for every divergence: time and peak memory.

    python -m benchmarks.bench_cpu                       # 2048 x 32000, fp32 and bf16, 2 threads
    python -m benchmarks.bench_cpu --tokens 256 --vocab 4096 --repeats 1   # a quick look

"eager" is fdistill's pure-PyTorch reference run in the input dtype (float32 compute), the same
formulas without fusion but with the masking that makes -inf entries and empty rows safe; for
forward_kl and jsd a second baseline, "naive", is the formula users write by hand (``F.kl_div`` on
two log-softmaxes; TRL's ``generalized_jsd_loss`` recipe). "in place" is ``grad_in_place=True``
(the gradient overwrites the student logits: no new [tokens, V] buffer to allocate and fault in).
Times are medians of --repeats runs after one warm-up. Peak memory is what a forward+backward adds
to the resident set on top of the inputs (the float32 / bf16 gradient alone is tokens x V x itemsize).
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
import torch.nn.functional as F

import fdistill
from benchmarks.harness import format_table, median_seconds, peak_memory_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive_loss(divergence: str):
    """Hand-written eager formulas of the kind users port (forward KL, and JSD at beta = 0.5)."""
    if divergence == "forward_kl":
        return lambda s, t: F.kl_div(
            F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True, reduction="batchmean"
        )
    if divergence == "jsd":

        def jsd(s, t, beta=0.5):
            ls, lt = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
            lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
            kl_t = F.kl_div(lm, lt, reduction="none", log_target=True)
            kl_s = F.kl_div(lm, ls, reduction="none", log_target=True)
            return (beta * kl_t + (1 - beta) * kl_s).sum() / s.shape[0]

        return jsd
    return None


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--divergences", default=",".join(fdistill.DIVERGENCES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-naive", action="store_true", help="skip the hand-written baselines")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    headers = ["divergence", "dtype", "fused fwd", "fused fwd+bwd", "fused fwd+bwd in place",
               "eager fwd", "eager fwd+bwd", "speed-up fwd+bwd", "fused peak MB", "eager peak MB",
               "grad MB"]  # fmt: skip
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        student = (torch.randn(args.tokens, args.vocab) * 2).to(dtype)
        teacher = (torch.randn(args.tokens, args.vocab) * 2).to(dtype)
        grad_mb = student.numel() * student.element_size() / 2**20
        for divergence in args.divergences.split(","):
            fused = lambda s, t, d=divergence: fdistill.divergence_loss(s, t, d, backend="cpu")  # noqa: E731
            eager = lambda s, t, d=divergence: fdistill.divergence_loss(s, t, d, backend="reference")  # noqa: E731
            baselines = [("eager", eager)]
            if not args.no_naive and naive_loss(divergence) is not None:
                baselines.append(("naive", naive_loss(divergence)))
            f_fwd, f_full, f_mem = measure(fused, student, teacher, args.repeats)
            in_place = lambda s, t, d=divergence: fdistill.divergence_loss(  # noqa: E731
                s, t, d, backend="cpu", grad_in_place=True
            )
            f_in_place = measure_in_place(in_place, student, teacher, args.repeats)
            for label, baseline in baselines:
                e_fwd, e_full, e_mem = measure(baseline, student, teacher, args.repeats)
                rows.append([
                    divergence if label == "eager" else f"{divergence} ({label})", dname,
                    f"{f_fwd:.3f} s", f"{f_full:.3f} s", f"{f_in_place:.3f} s",
                    f"{e_fwd:.3f} s", f"{e_full:.3f} s",
                    f"{e_full / f_full:.1f}x",
                    f"{f_mem / 2**20:.0f}" if f_mem is not None else "n/a",
                    f"{e_mem / 2**20:.0f}" if e_mem is not None else "n/a",
                    f"{grad_mb:.0f}",
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
