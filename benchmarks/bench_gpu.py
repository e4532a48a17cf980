"""GPU benchmark: fused Triton kernels vs eager PyTorch vs Liger-Kernel (run by benchmarks/gpu_check.sh).

    python -m benchmarks.bench_gpu                     # BT = 8192 tokens, V = 128256, bf16
    python -m benchmarks.bench_gpu --tokens 1024 --divergences forward_kl

For every divergence: median time of the forward (no gradient) and of forward+backward, from
``triton.testing.do_bench``; peak memory of forward+backward beyond the inputs
(``torch.cuda.max_memory_allocated``); and the memory floor of forward+backward, student and
teacher read once and the gradient written once (3 x BT x V x itemsize bytes), as a time at the
device-to-device copy bandwidth measured here and as the fraction of it achieved.

Baselines, for forward_kl, reverse_kl and jsd:
- eager: the formulas users write (``log_softmax`` of both, then ``F.kl_div`` / TRL's JSD recipe)
  in float32, as TRL's ``generalized_jsd_loss`` does;
- liger: Liger-Kernel's ``LigerKLDIVLoss`` (forward KL) and ``LigerJSD`` (beta = 1 is reverse KL,
  0.5 the JSD) on ``log_softmax`` of the bf16 logits, the log-softmax included in the time (a
  training step has to compute it); "liger kernel" times the loss alone on precomputed log-probs.
Liger is used when importable (on a machine without network, carry its wheel: see README).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import fdistill

BASELINE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def do_bench(fn) -> float:
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]  # median, ms


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def eager_loss(divergence: str):
    def forward_kl(s, t):
        ls, lt = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
        return F.kl_div(ls, lt, log_target=True, reduction="batchmean")

    def reverse_kl(s, t):
        ls, lt = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
        return F.kl_div(lt, ls, log_target=True, reduction="batchmean")

    def jsd(s, t, beta=0.5):
        ls, lt = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
        kl_t = F.kl_div(lm, lt, reduction="batchmean", log_target=True)
        kl_s = F.kl_div(lm, ls, reduction="batchmean", log_target=True)
        return beta * kl_t + (1 - beta) * kl_s

    return {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}[divergence]


def liger_loss(divergence: str, include_log_softmax: bool):
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return None
    if divergence == "forward_kl":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        loss = lambda log_q, log_p: kl(log_q, log_p)  # noqa: E731
    else:
        loss = LigerJSD(beta=1.0 if divergence == "reverse_kl" else 0.5)
    if include_log_softmax:
        return lambda s, t: loss(s.log_softmax(-1), t.log_softmax(-1))
    return loss


def measure(fn, student, teacher):
    """(forward ms, forward+backward ms, peak extra bytes of forward+backward)."""
    x = student.detach().clone().requires_grad_()

    def forward():
        with torch.no_grad():
            fn(student, teacher)

    def forward_backward():
        fn(x, teacher).backward()
        x.grad = None

    try:
        return do_bench(forward), do_bench(forward_backward), peak_extra_bytes(forward_backward)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return math.nan, math.nan, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--divergences", default=",".join(fdistill.DIVERGENCES))
    p.add_argument("--skip-fdiv", action="store_true", help="skip the f-softargmax / FY loss table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA GPU")
    from benchmarks.harness import format_table

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    student = (torch.randn(args.tokens, args.vocab, device="cuda") * 2).to(dtype)
    teacher = (torch.randn(args.tokens, args.vocab, device="cuda") * 2).to(dtype)
    floor_bytes = 3 * student.numel() * student.element_size()
    bandwidth = copy_bandwidth()
    floor_ms = floor_bytes / bandwidth * 1e3

    headers = ["divergence", "impl", "fwd ms", "fwd+bwd ms", "peak GB", "% of floor", "GB/s (floor bytes)"]
    rows = []

    def add(divergence, impl, result):
        fwd, full, peak = result
        rows.append([
            divergence, impl, f"{fwd:.2f}", f"{full:.2f}",
            "OOM" if peak is None else f"{peak / 1e9:.2f}",
            f"{100 * floor_ms / full:.0f}%" if full == full else "-",
            f"{floor_bytes / (full * 1e-3) / 1e9:.0f}" if full == full else "-",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)

    for divergence in args.divergences.split(","):
        fused = lambda s, t, d=divergence: fdistill.divergence_loss(s, t, d, backend="triton")  # noqa: E731
        add(divergence, "fdistill triton", measure(fused, student, teacher))
        in_place = lambda s, t, d=divergence: fdistill.divergence_loss(  # noqa: E731
            s, t, d, backend="triton", grad_in_place=True
        )
        add(divergence, "fdistill triton, grad in place", measure(in_place, student, teacher))
        if divergence not in BASELINE_DIVERGENCES:
            continue
        add(divergence, "eager (fp32 log_softmax)", measure(eager_loss(divergence), student, teacher))
        for include, label in ((True, "liger (with log_softmax)"), (False, "liger kernel only")):
            liger = liger_loss(divergence, include)
            if liger is None:
                print("liger-kernel not importable: its rows are skipped")
                break
            if include:
                add(divergence, label, measure(liger, student, teacher))
            else:
                log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
                add(divergence, label, measure(liger, log_q, log_p))
                del log_q, log_p

    print()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fdistill {fdistill.__version__}; "
        f"BT={args.tokens}, V={args.vocab}, {args.dtype}; memory floor {floor_bytes / 1e9:.2f} GB = "
        f"{floor_ms:.2f} ms at the measured copy bandwidth {bandwidth / 1e12:.2f} TB/s; do_bench medians"
    )
    print(format_table(headers, rows))
    if not args.skip_fdiv:
        print()
        print(
            f"f-divergence operators, BT={args.tokens}, V={args.vocab}, {args.dtype} (target: <= 3x softmax)"
        )
        print(fdiv_table(args.tokens, args.vocab, dtype))


def fdiv_table(tokens: int, vocab: int, dtype: torch.dtype) -> str:
    """f_softargmax (the bisection / Newton kernels) and fy_loss against torch.softmax on the GPU."""
    from benchmarks.harness import format_table

    logits = (torch.randn(tokens, vocab, device="cuda") * 4).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    softmax = do_bench(lambda: torch.softmax(logits, -1))
    rows = [["softmax (torch)", "-", f"{softmax:.2f}", "1.0x"]]
    backends = ["triton"] + (["cuda"] if fdistill.has_cuda_kernels() else [])
    for backend in backends:
        for f, alpha in (("alpha", 1.5), ("alpha", 2.0), ("js", 1.5)):
            name = f"{f} {alpha}" if f == "alpha" else f
            ms = do_bench(
                lambda f=f, a=alpha, b=backend: fdistill.f_softargmax(logits, f, alpha=a, backend=b)
            )
            rows.append([f"f_softargmax ({name})", backend, f"{ms:.2f}", f"{ms / softmax:.1f}x"])

        def fy_step(b=backend):
            x = logits.detach().requires_grad_()
            fdistill.fy_loss(x, labels, "alpha", alpha=1.5, backend=b).backward()

        ms = do_bench(fy_step)
        rows.append(["fy_loss fwd+bwd (alpha 1.5)", backend, f"{ms:.2f}", f"{ms / softmax:.1f}x"])
    return format_table(["operator", "backend", "ms", "/ softmax"], rows)


if __name__ == "__main__":
    main()
