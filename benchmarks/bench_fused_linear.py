"""Fused-linear distillation losses vs the materialised path (logits, then the loss), CPU or GPU.

    python -m benchmarks.bench_fused_linear                       # CPU: 4096 tokens, H 512, V 32000 fp32
    python -m benchmarks.bench_fused_linear --device cuda         # GPU: 8192 tokens, H 4096, V 128256 bf16
    python -m benchmarks.bench_fused_linear --device cuda --tokens 1024

Student and teacher are each given as an LM head (hidden states + weight, the teacher's frozen).
One forward+backward step of each implementation:

- ``materialised (fdistill)``: ``F.linear`` logits of both models, then ``fdistill.divergence_loss``
  (the fused row kernel): the strongest non-chunked path.
- ``materialised (eager)``: the same logits, then the divergence written in eager PyTorch.
- ``fused-linear (fdistill)``: ``fdistill.fused_linear_divergence_loss`` (default chunk size).
- ``liger fused-linear JSD`` (GPU, when liger-kernel is importable): ``LigerFusedLinearJSD``; its
  beta = 0.5 row is the same loss as fdistill's ``jsd`` with beta = 0.5.

Medians of 3 runs after a warm-up (CPU) or of ``triton.testing.do_bench`` (GPU); peak memory is
what the step adds above the inputs (CPU: resident-set high-water mark; GPU: max allocated).
Targets (issue 5): CPU peak <= 30% and time <= 1.2x of the materialised path; GPU peak <= 50% of
Liger's and time <= 1.0x of it.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

import fdistill

from .harness import format_table, median_seconds, peak_memory_bytes

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def eager_divergence(s, t, divergence):
    ls, lt = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
    if divergence == "forward_kl":
        return F.kl_div(ls, lt, log_target=True, reduction="batchmean")
    if divergence == "reverse_kl":
        return F.kl_div(lt, ls, log_target=True, reduction="batchmean")
    m = torch.logsumexp(torch.stack([ls, lt]) + torch.log(torch.tensor(0.5)), 0)
    return 0.5 * (
        F.kl_div(m, lt, log_target=True, reduction="batchmean")
        + F.kl_div(m, ls, log_target=True, reduction="batchmean")
    )


def make_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 / hidden**0.5

    def draw(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype=dtype, device=device)

    student_w = draw(vocab, hidden, s=scale).requires_grad_()
    student_h = draw(tokens, hidden).requires_grad_()
    teacher_w, teacher_h = draw(vocab, hidden, s=scale), draw(tokens, hidden)
    return student_h, student_w, teacher_h, teacher_w


def steps(inputs, divergence):
    """{name: a function running one forward+backward step}."""
    sh, sw, th, tw = inputs

    def zero():
        sh.grad = sw.grad = None

    def materialised(loss_fn):
        def step():
            zero()
            with torch.no_grad():
                t = F.linear(th, tw)
            loss_fn(F.linear(sh, sw), t).backward()

        return step

    def fused():
        zero()
        fdistill.fused_linear_divergence_loss(
            sh, sw, teacher_hidden=th, teacher_weight=tw, divergence=divergence
        ).backward()

    result = {
        "materialised (fdistill)": materialised(lambda s, t: fdistill.divergence_loss(s, t, divergence)),
        "materialised (eager)": materialised(lambda s, t: eager_divergence(s, t, divergence)),
        "fused-linear (fdistill)": fused,
    }
    if divergence == "jsd" and sh.is_cuda:
        liger = liger_fused_jsd(inputs)
        if liger is not None:
            result["liger fused-linear JSD"] = liger
    return result


def liger_fused_jsd(inputs):
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        print("liger-kernel not importable: its row is skipped")
        return None
    sh, sw, th, tw = inputs
    loss_fn = LigerFusedLinearJSD(jsd_beta=0.5)

    def step():
        sh.grad = sw.grad = None
        loss_fn(sh, sw, th, tw).backward()

    return step


def measure_cpu(step, repeats):
    return median_seconds(step, repeats), peak_memory_bytes(step)


def measure_cuda(step, repeats):
    from .bench_gpu import do_bench, peak_extra_bytes

    return do_bench(step) * 1e-3, peak_extra_bytes(step)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=fdistill.DIVERGENCES)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    tokens = args.tokens or (8192 if gpu else 4096)
    hidden = args.hidden or (4096 if gpu else 512)
    vocab = args.vocab or (128256 if gpu else 32000)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if gpu else "fp32")]
    torch.set_num_threads(args.threads)
    inputs = make_inputs(tokens, hidden, vocab, dtype, args.device)
    measure = measure_cuda if gpu else measure_cpu
    where = (
        torch.cuda.get_device_name() if gpu else f"CPU, {args.threads} threads ({fdistill.cpu_capability()})"
    )
    dtype_name = str(dtype).removeprefix("torch.")
    shape = f"{tokens} tokens, H {hidden}, V {vocab}, {dtype_name}"
    print(f"{shape}, student + teacher heads; {where}; torch {torch.__version__}")
    rows = []
    for divergence in args.divergences:
        results = {name: measure(step, args.repeats) for name, step in steps(inputs, divergence).items()}
        base_t, base_m = results["materialised (fdistill)"]
        for name, (seconds, peak) in results.items():
            rows.append(
                [
                    divergence,
                    name,
                    f"{seconds * 1e3:.1f} ms",
                    f"{seconds / base_t:.2f}x",
                    f"{peak / 2**20:.0f} MiB",
                    f"{peak / base_m:.0%}",
                ]
            )
    headers = ["divergence", "implementation", "fwd+bwd", "/ materialised", "peak extra", "/ materialised"]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
