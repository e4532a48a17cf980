"""Shared helpers of the test suite: seeded inputs, verbose comparisons, the float64 oracle."""

from __future__ import annotations

import contextlib
import math
import os
import zlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdistill
from fdistill.reference import divergence_rows_reference

LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# (divergence, keyword options): every divergence, with the endpoints of every parameter.
DIVERGENCE_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jeffreys", {"beta": 0.0}),
    ("jeffreys", {"beta": 0.3}),
    ("jeffreys", {"beta": 1.0}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"skew": 0.0}),
    ("skew_kl", {"skew": 0.1}),
    ("skew_kl", {"skew": 1.0}),
    ("skew_reverse_kl", {"skew": 0.0}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 1.0}),
    ("tv", {}),
    ("alpha", {"alpha": -0.5}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 1.5}),
    ("alpha", {"alpha": 3.0}),
]


def case_id(case) -> str:
    divergence, options = case
    return divergence + "".join(f"-{k}={v}" for k, v in options.items())


def param_of(divergence: str, options: dict) -> float:
    """The scalar the raw op and the reference take for these keyword options."""
    if divergence in ("jeffreys", "jsd"):
        return float(options.get("beta", 0.5))
    if divergence in ("skew_kl", "skew_reverse_kl"):
        return float(options.get("skew", 0.1))
    if divergence == "alpha":
        return float(options.get("alpha", 0.5))
    return 0.0


def seed_from(text: str) -> int:
    """A reproducible seed from any text (a test's node id)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_logits(
    shape,
    dtype=torch.float32,
    scale: float = 3.0,
    seed: int = 0,
    neg_inf_frac: float = 0.0,
    shared_mask: bool = True,
    offset: float = 0.0,
):
    """A (student, teacher) pair of logits in ``dtype``, drawn in float64 from a seeded generator.

    ``neg_inf_frac`` of the vocabulary entries are -inf: at the same positions in both when
    ``shared_mask``, else at independent positions. ``offset`` is added per row (different for
    student and teacher, drawn in ``[-offset, offset]``).
    """
    g = generator(seed)
    shape = tuple(shape)
    student = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if offset:
        lead = shape[:-1] + (1,)
        student = student + (2 * torch.rand(lead, generator=g, dtype=torch.float64) - 1) * offset
        teacher = teacher + (2 * torch.rand(lead, generator=g, dtype=torch.float64) - 1) * offset
    if neg_inf_frac > 0:
        mask_s = torch.rand(shape, generator=g) < neg_inf_frac
        mask_t = mask_s if shared_mask else torch.rand(shape, generator=g) < neg_inf_frac
        student = student.masked_fill(mask_s, -math.inf)
        teacher = teacher.masked_fill(mask_t, -math.inf)
    return student.to(dtype), teacher.to(dtype)


def make_labels(lead_shape, seed: int, ignore_frac: float = 0.3, ignore_index: int = -100, vocab: int = 100):
    """int64 labels with about ``ignore_frac`` of them (and at least one, not all) equal to ignore_index."""
    g = generator(seed + 1)
    labels = torch.randint(0, vocab, tuple(lead_shape), generator=g)
    ignore = torch.rand(tuple(lead_shape), generator=g) < ignore_frac
    flat = ignore.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = True, False
    return labels.masked_fill(ignore, ignore_index)


def assert_close_verbose(
    actual, expected, atol: float, rtol: float, name: str = "tensor", max_report: int = 6
):
    """``|actual - expected| <= atol + rtol |expected|`` elementwise, with NaN and +-inf at the same places.

    Compares in float64; a failure reports the mismatch count and the first few indices with values.
    """
    assert isinstance(actual, torch.Tensor), f"{name}: actual is a {type(actual).__name__}, not a tensor"
    expected = torch.as_tensor(expected)
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    problems = []
    for what, fa, fe in (
        ("NaN", torch.isnan(a), torch.isnan(e)),
        ("+inf", torch.isposinf(a), torch.isposinf(e)),
        ("-inf", torch.isneginf(a), torch.isneginf(e)),
    ):
        bad = fa != fe
        if bad.any():
            idx = bad.nonzero()[:max_report].tolist()
            detail = ", ".join(
                f"{tuple(i)}: got {a[tuple(i)].item()!r} want {e[tuple(i)].item()!r}" for i in idx
            )
            problems.append(f"{int(bad.sum())} positions where {what} differs: {detail}")
    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    allowed = atol + rtol * e.abs()
    bad = finite & (diff > allowed)
    if bad.any():
        idx = bad.nonzero()[:max_report].tolist()
        detail = "; ".join(
            f"{tuple(i)}: got {a[tuple(i)].item():.10g} want {e[tuple(i)].item():.10g} "
            f"(diff {diff[tuple(i)].item():.3g})"
            for i in idx
        )
        worst = (diff - allowed).argmax()
        problems.append(
            f"{int(bad.sum())}/{a.numel()} elements differ beyond atol={atol:.3g} rtol={rtol:.3g}; "
            f"max abs diff {diff.max().item():.3g} (at flat index {worst.item()}); first: {detail}"
        )
    if problems:
        raise AssertionError(f"{name}: " + " | ".join(problems))


def max_abs_err(actual, expected) -> float:
    """max |actual - expected| over entries finite in both (NaN/inf placement checked elsewhere)."""
    a, e = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(a) & torch.isfinite(e)
    if not finite.any():
        return 0.0
    return (a - e)[finite].abs().max().item()


def reference_rows64(student, teacher, divergence, param, temperature=1.0, labels=None, ignore_index=-100):
    """Per-row loss in float64 of the float64 copies of the inputs; ignored rows are 0."""
    rows = divergence_rows_reference(
        student.reshape(-1, student.shape[-1]).double(),
        teacher.reshape(-1, teacher.shape[-1]).double(),
        divergence,
        param,
        temperature,
    )
    if labels is not None:
        rows = torch.where(labels.reshape(-1) != ignore_index, rows, torch.zeros_like(rows))
    return rows.reshape(student.shape[:-1])


def reduce_rows(rows, reduction, labels=None, ignore_index=-100):
    """The documented reductions, written independently of fdistill.losses."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if labels is None else int((labels != ignore_index).sum())
    return rows.sum() / max(count, 1)


def loss_and_grad(student, teacher, divergence, options, reduction="mean", weight=None, **kwargs):
    """fdistill.divergence_loss and d(objective)/d(student), objective = loss or (loss * weight).sum()."""
    s = student.detach().clone().requires_grad_(True)
    loss = fdistill.divergence_loss(s, teacher.detach(), divergence, reduction=reduction, **options, **kwargs)
    objective = loss if reduction != "none" else (loss * weight.to(loss.dtype)).sum()
    if not objective.requires_grad:  # the reference backend, when the loss does not depend on the student
        return loss.detach(), torch.zeros_like(s)
    (grad,) = torch.autograd.grad(objective, s)
    return loss.detach(), grad


def oracle_loss_and_grad(
    student, teacher, divergence, options, reduction="mean", weight=None, temperature=1.0, labels=None, **kw
):
    """Loss and student gradient of the pure-PyTorch reference in float64, reduced independently."""
    assert not kw, kw
    s = student.detach().double().requires_grad_(True)
    rows = reference_rows64(
        s, teacher.detach().double(), divergence, param_of(divergence, options), temperature, labels
    )
    loss = reduce_rows(rows, reduction, labels)
    objective = loss if reduction != "none" else (loss * weight.double()).sum()
    if not objective.requires_grad:  # e.g. skew_kl with skew = 1 does not depend on the student
        return loss.detach(), torch.zeros_like(s)
    (grad,) = torch.autograd.grad(objective, s)
    return loss.detach(), grad


class OpRecorder(TorchDispatchMode):
    """Records the names of the aten / custom ops that run inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cpu_capability(name: str):
    """Run the CPU kernels with the instruction set capped at ``name`` (in this process)."""
    old = os.environ.get("FDISTILL_CPU_CAPABILITY")
    os.environ["FDISTILL_CPU_CAPABILITY"] = name
    try:
        yield fdistill.cpu_capability(refresh=True)
    finally:
        if old is None:
            del os.environ["FDISTILL_CPU_CAPABILITY"]
        else:
            os.environ["FDISTILL_CPU_CAPABILITY"] = old
        fdistill.cpu_capability(refresh=True)


def hardware_capabilities() -> list[str]:
    """The instruction sets this CPU can run, from /proc/cpuinfo (x86-64 Linux), plus 'default'."""
    found = ["default"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return found
    if {"avx2", "fma", "f16c"} <= set(flags):
        found.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
            found.append("avx512")
    return found


# ----------------------------------------------------------------------------- any backend / device


def tolerances(dtype, slack: float = 1.0):
    """(loss atol, loss rtol, grad rel-to-scale atol, grad rtol) of a fused kernel vs float64.

    The rule of the CPU kernel tests (test_divergence_loss.py); ``slack`` widens the float32
    arithmetic terms (CUDA Triton uses approximate exp / log), never the rounding to the grad dtype.
    """
    if dtype == torch.float64:
        return 1e-10 * slack, 1e-10 * slack, 1e-10 * slack, 1e-9 * slack
    # float32 arithmetic inside the kernel, whatever the input dtype
    grad_rtol = 2e-5 * slack if dtype == torch.float32 else torch.finfo(dtype).eps  # 1 ulp of the grad dtype
    return 1e-5 * slack, 1e-5 * slack, 2e-5 * slack, grad_rtol


def check_against_oracle(
    student, teacher, divergence, options, *, backend, reduction, weight=None, slack=1.0, **kwargs
):
    """Loss and gradient of ``backend`` vs the float64 reference (on the inputs' device): (loss, grad).

    The same tolerance logic as the CPU kernel tests: a per-row tolerance for ``none``, one that
    grows with the sum of the magnitudes for ``sum`` / ``mean``, and a gradient tolerance relative
    to its natural unit (the largest upstream weight of a row, over T).
    """
    dtype = student.dtype
    loss, grad = loss_and_grad(
        student, teacher, divergence, options, reduction, weight, backend=backend, **kwargs
    )
    want_loss, want_grad = oracle_loss_and_grad(
        student, teacher, divergence, options, reduction, weight, **kwargs
    )
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == student.shape and grad.device == student.device
    loss_atol, loss_rtol, grad_atol, grad_rtol = tolerances(dtype, slack)
    labels = kwargs.get("labels")
    temperature = kwargs.get("temperature", 1.0)
    ignore_index = kwargs.get("ignore_index", -100)

    if reduction == "none":
        assert_close_verbose(loss, want_loss, loss_atol, loss_rtol, "loss")
    else:  # the error of a sum grows with the sum of the magnitudes
        rows = reference_rows64(
            student, teacher, divergence, param_of(divergence, options), temperature, labels, ignore_index
        )
        count = rows.numel() if labels is None else int((labels != ignore_index).sum())
        tol = loss_atol * rows.numel() + loss_rtol * rows.abs().sum().item()
        if reduction == "mean":
            tol /= max(count, 1)
        assert_close_verbose(loss, want_loss, tol, 0.0, "loss")

    if reduction == "none":
        unit = weight.abs().max().item()
    elif reduction == "sum":
        unit = 1.0
    else:
        count = student[..., 0].numel() if labels is None else int((labels != ignore_index).sum())
        unit = 1.0 / max(count, 1)
    gscale = max(want_grad.abs().max().item(), unit / temperature)
    expected = want_grad.to(dtype) if dtype in LOW_PRECISION else want_grad  # rounded to the grad dtype
    tiny = 2.0**-24 if dtype == torch.float16 else 0.0  # float16 subnormal spacing
    assert_close_verbose(grad, expected, grad_atol * gscale + tiny, grad_rtol, "grad")
    return loss, grad


def one_case_per_divergence(cases=None):
    """The first case of each divergence in ``cases`` (default DIVERGENCE_CASES), with a mid parameter."""
    picked = {}
    for divergence, options in cases or DIVERGENCE_CASES:
        value = next(iter(options.values()), None)
        if divergence not in picked or value in (0.3, 0.1, 1.5):
            picked[divergence] = (divergence, options)
    return list(picked.values())


# Large logits: a fused kernel must be about as accurate as eager float32 PyTorch on the same input.
LARGE_CASES = [c for c in DIVERGENCE_CASES if c[0] != "alpha"] + [("alpha", {"alpha": 0.5})]


def large_inputs(kind: str, seed: int, vocab: int = 1271):
    """float32 (6, vocab) logits: randn * 5 + a per-row offset in [-1e4, 1e4] ("offset"), or randn * 100."""
    if kind == "offset":
        return make_logits((6, vocab), torch.float32, scale=5.0, seed=seed, offset=1e4)
    return make_logits((6, vocab), torch.float32, scale=100.0, seed=seed)


def two_x_eager_violations(
    student, teacher, weight, backend, slack: float = 1.0, cases=LARGE_CASES, factor: float = 2.0
) -> dict:
    """The cases where err(backend vs float64) > 2 err(eager float32 reference vs float64) + a small atol.

    Loss and gradient, reduction "none" with upstream ``weight``; returns {case name: message}.
    ``factor`` replaces the 2.
    """
    eps = torch.finfo(torch.float32).eps
    bad = {}
    for divergence, options in cases:
        loss, grad = loss_and_grad(student, teacher, divergence, options, "none", weight, backend=backend)
        eager = loss_and_grad(student, teacher, divergence, options, "none", weight, backend="reference")
        want_loss, want_grad = oracle_loss_and_grad(student, teacher, divergence, options, "none", weight)
        errors = {
            "loss": (
                max_abs_err(loss, want_loss),
                max_abs_err(eager[0], want_loss),
                4 * eps * slack * max(1.0, want_loss.abs().max().item()),
            ),
            "grad": (
                max_abs_err(grad, want_grad),
                max_abs_err(eager[1], want_grad),
                4 * eps * slack * max(weight.abs().max().item(), want_grad.abs().max().item()),
            ),
        }
        for name, (kernel_err, eager_err, atol) in errors.items():
            if not kernel_err <= factor * eager_err + atol:
                bad[f"{divergence}{options or ''} {name}"] = (
                    f"{backend} {kernel_err:.2e} > {factor:g} x eager {eager_err:.2e} + {atol:.1e}"
                )
    return bad
