"""CPU benchmark of the f-divergence operators: f_softargmax, f_softmax and fy_loss against softmax.

    python -m benchmarks.bench_fdiv [--tokens 2048] [--vocab 32000] [--threads 2]

Prints one Markdown table: median seconds (3 runs after a warm-up) and the ratio to
``torch.softmax`` on the same fp32 tensor. Targets (issue 4): f_softargmax(alpha=1.5) <= 3x softmax,
fy_loss forward+backward <= 4x softmax.
"""

from __future__ import annotations

import argparse

import torch

import fdistill

from .harness import format_table, median_seconds

CASES = [("alpha", 1.5), ("alpha", 2.0), ("alpha", 1.25), ("kl", 1.5), ("js", 1.5), ("reverse_kl", 1.5)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab) * 4
    labels = torch.randint(0, args.vocab, (args.tokens,))
    softmax = median_seconds(lambda: torch.softmax(logits, -1), args.repeats)
    rows = [["softmax (torch)", "-", f"{softmax:.3f} s", "1.0x", "-", "-"]]

    def fy_step(f, alpha):
        x = logits.detach().requires_grad_()
        fdistill.fy_loss(x, labels, f, alpha=alpha).backward()

    for f, alpha in CASES:
        name = f if f != "alpha" else f"alpha={alpha}"
        fwd = median_seconds(lambda f=f, a=alpha: fdistill.f_softargmax(logits, f, alpha=a), args.repeats)
        fy = median_seconds(lambda f=f, a=alpha: fy_step(f, a), args.repeats)
        rows.append([f"f_softargmax / fy_loss ({name})", "uniform", f"{fwd:.3f} s", f"{fwd / softmax:.1f}x",
                     f"{fy:.3f} s", f"{fy / softmax:.1f}x"])  # fmt: skip
    fwd = median_seconds(lambda: fdistill.f_softargmax(logits, alpha=1.5, reference="unit"), args.repeats)
    fy = median_seconds(lambda: fy_step("alpha", 1.5), args.repeats)
    rows.append(
        ["f_softargmax (alpha=1.5, entmax)", "unit", f"{fwd:.3f} s", f"{fwd / softmax:.1f}x", "-", "-"]
    )
    print(
        f"{args.tokens} x {args.vocab} fp32, {args.threads} threads, CPU kernels: {fdistill.cpu_capability()}"
    )
    headers = ["operator", "reference", "forward", "/ softmax", "fy_loss fwd+bwd", "/ softmax"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
