"""Shared helpers of the test suite: seeded inputs, verbose comparisons, the float64 oracle, the
case lists, the Triton skip marks, and the bodies of the tests that run for more than one backend."""

from __future__ import annotations

import contextlib
import math
import os
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdistill
from fdistill._triton_dispatch import interpreter_enabled, triton_available
from fdistill.reference import divergence_rows_reference

INF, NAN = math.inf, math.nan
SCALE = 2.5  # standard deviation of the random logits of most tests
LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ALL_DTYPE_IDS = [str(d).removeprefix("torch.") for d in ALL_DTYPES]

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


CASE_IDS = [case_id(c) for c in DIVERGENCE_CASES]
# one case per divergence, with a parameter inside its range
SECTION = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jeffreys", {"beta": 0.3}),
    ("jsd", {"beta": 0.3}),
    ("skew_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("tv", {}),
    ("alpha", {"alpha": 1.5}),
]
SECTION_IDS = [case_id(c) for c in SECTION]
# (divergence, param) for torch.library.opcheck of the raw ops
OPCHECK_CASES = [("forward_kl", 0.0), ("jsd", 0.3), ("skew_reverse_kl", 0.1), ("tv", 0.0), ("alpha", 1.5)]

# ----------------------------------------------------------------------------- where Triton runs

ON_CUDA = torch.cuda.is_available()
TRITON_DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
if not triton_available():
    _TRITON_SKIP_REASON = "triton is not installed"
elif not ON_CUDA and not interpreter_enabled():
    _TRITON_SKIP_REASON = "no GPU, and TRITON_INTERPRET=1 is not set"
else:
    _TRITON_SKIP_REASON = ""
TRITON_RUNS = not _TRITON_SKIP_REASON
# skips a Triton test (or, in pytestmark, a module) where the Triton kernels cannot run
SKIP_WITHOUT_TRITON = pytest.mark.skipif(not TRITON_RUNS, reason=_TRITON_SKIP_REASON or "Triton runs")
# numpy inside the Triton interpreter evaluates masked lanes too (-inf - -inf, exp overflow, log 0)
TRITON_INTERPRETER_WARNINGS = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


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


def randn(shape, seed: int, dtype=torch.float32, device="cpu"):
    """Standard normal values from a seeded generator, drawn on the CPU, then moved to ``device``."""
    return torch.randn(shape, generator=generator(seed), dtype=dtype).to(device)


def make_logits(
    shape,
    dtype=torch.float32,
    scale: float = 3.0,
    seed: int = 0,
    neg_inf_frac: float = 0.0,
    shared_mask: bool = True,
    offset: float = 0.0,
    device="cpu",
):
    """A (student, teacher) pair of logits in ``dtype`` on ``device``, drawn in float64 from a seeded
    generator.

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
    return student.to(device, dtype), teacher.to(device, dtype)


def make_labels(
    lead_shape, seed: int, ignore_frac: float = 0.3, ignore_index: int = -100, vocab: int = 100, device="cpu"
):
    """int64 labels with about ``ignore_frac`` of them (and at least one, not all) equal to ignore_index."""
    g = generator(seed + 1)
    labels = torch.randint(0, vocab, tuple(lead_shape), generator=g)
    ignore = torch.rand(tuple(lead_shape), generator=g) < ignore_frac
    flat = ignore.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = True, False
    return labels.masked_fill(ignore, ignore_index).to(device)


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
    # 1 ulp of the grad dtype; bf16: 2 (the one-pass gradient is rounded to bf16 before the upstream
    # factor is known, then rescaled: two roundings wherever that factor is not the one of the forward)
    grad_rtol = torch.finfo(dtype).eps * (2 if dtype == torch.bfloat16 else 1)
    grad_rtol = 2e-5 * slack if dtype == torch.float32 else grad_rtol
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


def opposite_offset_logits(seed: int, device="cpu"):
    """float32 (4, 1000) logits: randn * 5 + 1e4 (student) and randn * 5 - 1e4 (teacher)."""
    g = generator(seed)
    student = (torch.randn(4, 1000, generator=g, dtype=torch.float64) * 5 + 1e4).float()
    teacher = (torch.randn(4, 1000, generator=g, dtype=torch.float64) * 5 - 1e4).float()
    return student.to(device), teacher.to(device)


# ----------------------------------------------------------------------------- tests of several backends
# The checks that the tests of the C++ kernel (backend="cpu") and of the Triton kernels make alike;
# the tests choose the inputs (shapes, dtypes, device) and the slack of the tolerances.


def special_rows_logits(dtype, vocab: int, seed: int, student_nan: int, teacher_nan: int, student_inf: int):
    """(student, teacher, clean student, clean teacher): 10 rows, 0-6 special, 7-9 the clean ones.

    Row 0 all -inf in both (padding), row 1 all -inf in the student, row 2 in the teacher, a NaN in
    row 3 (student) and row 4 (teacher), +inf in row 5 (student) and row 6 (teacher, column 0).
    """
    student, teacher = make_logits((7, vocab), dtype, scale=1.0, seed=seed)  # float16 gradients stay finite
    student[0], teacher[0] = -INF, -INF  # padding: loss 0, gradient 0
    student[1] = -INF  # no student distribution
    teacher[2] = -INF  # no teacher distribution
    student[3, student_nan] = NAN
    teacher[4, teacher_nan] = NAN
    student[5, student_inf] = INF
    teacher[6, 0] = INF
    clean_s, clean_t = make_logits((3, vocab), dtype, scale=1.0, seed=seed + 1)
    return torch.cat([student, clean_s]), torch.cat([teacher, clean_t]), clean_s, clean_t


def check_special_rows(
    student, teacher, clean_s, clean_t, divergence, options, weight, *, backend, oracle=True
):
    """Rows 0-6 special (see special_rows_logits), rows 7.. clean: padding gives 0 / 0; one-sided empty,
    NaN or +inf rows give NaN, nothing else does; the clean rows are bit for bit as computed alone;
    with ``oracle``, the special rows' losses are exactly the float64 reference's."""
    loss, grad = loss_and_grad(student, teacher, divergence, options, "none", weight, backend=backend)
    assert loss[0].item() == 0 and (grad[0] == 0).all()
    assert torch.isnan(loss[1:7]).all(), loss
    assert torch.isnan(grad[1:7]).all(), "NaN rows propagate NaN into every gradient entry"
    assert torch.isfinite(loss[7:]).all() and torch.isfinite(grad[7:]).all()
    clean = loss_and_grad(clean_s, clean_t, divergence, options, "none", weight[7:], backend=backend)
    assert torch.equal(loss[7:], clean[0]) and torch.equal(grad[7:], clean[1])
    if oracle:  # the reference agrees on every special row
        want_loss, _ = oracle_loss_and_grad(student, teacher, divergence, options, "none", weight)
        assert_close_verbose(loss[:7], want_loss[:7], 0, 0, "special rows vs reference")


def check_ties_give_zero(base, divergence, options, weight, *, backend, slack=1.0):
    """Identical student and teacher (``base``), and 2 constant rows: loss 0 and gradient 0."""
    rows, vocab = base.shape
    dtype = base.dtype
    student = torch.cat([base, torch.full((2, vocab), 4.0, dtype=dtype)]).to(weight.device)
    teacher = torch.cat([base.clone(), torch.full((2, vocab), -3.0, dtype=dtype)]).to(weight.device)
    loss, grad = loss_and_grad(
        student, teacher, divergence, options, "none", weight, temperature=1.3, backend=backend
    )
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    # one-pass KLs cancel E_p[t - s] against LSE(t) - LSE(s): a few ulps of |t - s| / T = 7 / 1.3
    loss_tol = 16 * eps * slack * (1 + 7.0 / 1.3)
    assert_close_verbose(loss, torch.zeros(rows + 2), loss_tol, 0, "loss")
    assert_close_verbose(
        grad, torch.zeros_like(grad), 16 * eps * slack * weight.abs().max().item(), 0, "grad"
    )


def check_one_sided_neg_inf(student, teacher, side, divergence, options, weight, *, backend, slack=1.0):
    """-inf on one side only, rows 0 and 1: the loss (finite or +inf) as the reference; the gradient
    where it is finite. Writes the -inf into ``student`` or ``teacher`` (``side``)."""
    target = teacher if side == "teacher" else student
    target[:2, :40] = -INF  # rows 0 and 1 are masked on one side, rows 2 and 3 are not
    loss, grad = loss_and_grad(student, teacher, divergence, options, "none", weight, backend=backend)
    want_loss, want_grad = oracle_loss_and_grad(student, teacher, divergence, options, "none", weight)
    assert_close_verbose(loss, want_loss, 1e-10 * slack, 1e-10 * slack, "loss")
    if divergence in ("forward_kl", "reverse_kl"):
        infinite = (divergence == "forward_kl") == (side == "student")
        assert (torch.isposinf(loss[:2]) if infinite else torch.isfinite(loss[:2])).all()
    assert not torch.isnan(loss).any() or divergence == "jeffreys", "a divergence is never NaN here"
    finite_rows = torch.isfinite(want_loss)
    assert finite_rows[2:].all()
    assert_close_verbose(grad[finite_rows], want_grad[finite_rows], 1e-10, 1e-9, "grad (finite rows)")


def check_all_tokens_ignored(student, teacher, divergence, options, reduction, **kwargs):
    """Every label is -100 (and a NaN in the student): loss 0 and gradient 0 for every reduction."""
    student[0, 1, 3] = NAN  # garbage in ignored rows must not matter
    labels = torch.full(student.shape[:-1], -100, device=student.device)
    s = student.clone().requires_grad_(True)
    loss = fdistill.divergence_loss(
        s, teacher, divergence, **options, labels=labels, reduction=reduction, **kwargs
    )
    if reduction == "none":
        assert torch.equal(loss, torch.zeros(student.shape[:-1], device=student.device))
    else:
        assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def check_ignored_rows_with_garbage(student, teacher, labels, divergence, options, weight, *, backend):
    """NaN / inf / all -inf garbage in ignored rows: same loss and gradient as with clean rows there
    (reductions mean, sum, and none with upstream ``weight``)."""
    ignored = labels == -100
    dirty_s, dirty_t = student.clone(), teacher.clone()
    dirty_s[ignored] = NAN
    dirty_t[ignored] = INF
    dirty_t[tuple(ignored.nonzero()[0])] = -INF
    for reduction, upstream in (("mean", None), ("sum", None), ("none", weight)):
        kwargs = {"labels": labels, "backend": backend}
        clean = loss_and_grad(student, teacher, divergence, options, reduction, upstream, **kwargs)
        dirty = loss_and_grad(dirty_s, dirty_t, divergence, options, reduction, upstream, **kwargs)
        assert torch.isfinite(dirty[0]).all() and torch.isfinite(dirty[1]).all(), reduction
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1]), reduction
        assert (dirty[1][ignored] == 0).all()


def check_scale_by_temperature_squared(student, teacher, divergence, options, *, backend):
    """scale_by_temperature_squared at T = 3 multiplies loss and gradient by 9: the unscaled (loss, grad)."""
    plain = loss_and_grad(student, teacher, divergence, options, "mean", temperature=3.0, backend=backend)
    scaled = loss_and_grad(
        student,
        teacher,
        divergence,
        options,
        "mean",
        temperature=3.0,
        scale_by_temperature_squared=True,
        backend=backend,
    )
    assert_close_verbose(scaled[0], plain[0] * 9.0, 0, 1e-14, "loss")
    assert_close_verbose(scaled[1], plain[1] * 9.0, 0, 1e-14, "grad")
    return plain


def check_triton_agrees_with_cpu(student, teacher, divergence, options, weight, *, tol, device, **kwargs):
    """backend="triton" on ``device`` vs backend="cpu" on CPU tensors, reduction "none": loss within
    ``tol`` relative (to max(1, max |loss|)), gradient within ``tol`` relative to its scale (the
    largest gradient entry or upstream weight over T). ``kwargs`` (labels, temperature) go to both.
    Returns the (loss, grad) pairs (cpu, triton)."""
    on = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    cpu = loss_and_grad(student, teacher, divergence, options, "none", weight, backend="cpu", **kwargs)
    tri = loss_and_grad(
        student.to(device),
        teacher.to(device),
        divergence,
        options,
        "none",
        weight.to(device),
        backend="triton",
        **on,
    )
    assert_close_verbose(tri[0], cpu[0], tol * max(1.0, cpu[0].abs().max().item()), tol, "loss")
    gscale = max(cpu[1].abs().max().item(), weight.abs().max().item() / kwargs.get("temperature", 1.0))
    assert_close_verbose(tri[1], cpu[1], tol * gscale, tol, "grad")
    return cpu, tri


def assert_stats_hold_lse(stats, student, teacher, keep, temperature, tol):
    """The forward's saved statistics hold the log-sum-exps of the scaled logits as (max, log-sum)
    in columns 0-1 (student) and 2-3 (teacher), on the rows ``keep``."""
    for name, x, col in (("s", student, 0), ("t", teacher, 2)):
        scaled = x[keep].double() / temperature
        assert_close_verbose(stats[keep, col], scaled.amax(-1), tol, tol, f"max({name})")
        lse = stats[keep, col].double() + stats[keep, col + 1].double()
        assert_close_verbose(lse, torch.logsumexp(scaled, -1), tol, tol, f"LSE({name})")


def opcheck_forward(fwd, divergence, param, dtype, labelled, seed, device="cpu"):
    """torch.library.opcheck of a forward op on (6, 37) logits, T = 1.7."""
    student, teacher = make_logits((6, 37), dtype, seed=seed, device=device)
    labels = make_labels((6,), seed, device=device) if labelled else None
    student.requires_grad_(True)
    torch.library.opcheck(fwd.default, (student, teacher, labels, divergence, param, 1.7, -100))


def opcheck_forward_grad(fwd_grad, divergence, param, dtype, labelled, seed, device="cpu"):
    """torch.library.opcheck of a one-pass op (loss, stats and the pre-scaled gradient) on (6, 37)
    logits, T = 1.7, grad_scale = 0.3: schema, fake, autograd registration (its backward rescales)."""
    student, teacher = make_logits((6, 37), dtype, seed=seed, device=device)
    labels = make_labels((6,), seed, device=device) if labelled else None
    student.requires_grad_(True)
    # Not test_aot_dispatch_*: in eager the backward rescales the op's third output in place (it is
    # the gradient buffer, consumed), which that test reads back as a wrong output. The compiled path
    # is checked end to end instead (test_compile_* of divergence_loss: compiled vs eager gradients).
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        fwd_grad.default, (student, teacher, labels, divergence, param, 1.7, -100, 0.3), test_utils=checks
    )


def opcheck_backward(fwd, bwd, divergence, param, dtype, labelled, seed, device="cpu"):
    """torch.library.opcheck of a backward op (out of place or in place) on (6, 37) logits, T = 1.7."""
    student, teacher = make_logits((6, 37), dtype, seed=seed, device=device)
    labels = make_labels((6,), seed, device=device) if labelled else None
    _, stats = fwd(student, teacher, labels, divergence, param, 1.7, -100)
    grad_loss = randn(6, seed, stats.dtype, device)
    torch.library.opcheck(
        bwd.default, (grad_loss, student, teacher, labels, stats, divergence, param, 1.7, -100)
    )


def compiled_vs_eager(compiled, eager, shapes, dtype, seed, device="cpu", scale=3.0, grad_rtol=1e-6):
    """``compiled`` and ``eager`` (student, teacher, labels) -> loss agree on loss and student gradient,
    on logits of each shape in ``shapes`` (drawn with ``scale``)."""
    for i, shape in enumerate(shapes):
        student, teacher = make_logits(shape, dtype, scale=scale, seed=seed + i, device=device)
        labels = make_labels(shape[:-1], seed + i, device=device)
        results = []
        for fn in (compiled, eager):
            s = student.clone().requires_grad_(True)
            loss = fn(s, teacher, labels)
            loss.backward()
            results.append((loss.detach(), s.grad))
        (closs, cgrad), (eloss, egrad) = results
        assert_close_verbose(closs, eloss, 1e-6, 1e-6, f"loss {shape}")
        assert_close_verbose(cgrad, egrad, 1e-7, grad_rtol, f"grad {shape}")


def run_linear_head(backend, grad_in_place, h, w, teacher, divergence, options, weight=None, **kwargs):
    """A non-leaf student, logits = h @ W (an LM head): (loss, logits, dL/dlogits, W.grad)."""
    w = w.detach().clone().requires_grad_(True)
    logits = (h @ w).view(teacher.shape)
    logits.retain_grad()
    loss = fdistill.divergence_loss(
        logits, teacher, divergence, **options, backend=backend, grad_in_place=grad_in_place, **kwargs
    )
    objective = (loss * weight).sum() if weight is not None else loss
    objective.backward()
    return loss.detach(), logits.detach(), logits.grad, w.grad


class Interrupt(Exception):
    """Raised by :func:`interrupt_rlhf_loops` at its chosen training step."""


def interrupt_rlhf_loops(monkeypatch, stop_at: int) -> None:
    """Every RLHF training loop runs through ``stages.run_loop``: make it raise ``Interrupt(stage name)``
    at the ``stop_at``-th training step counted over all of them (steps before it run as usual);
    :func:`restore_rlhf_loops` undoes it."""
    from fdistill.trainer.rlhf import stages

    real = getattr(stages.run_loop, "__wrapped__", stages.run_loop)
    calls = [0]

    def interrupted_loop(name, ckpt, steps, step_fn, **kwargs):
        def step():
            calls[0] += 1
            if calls[0] == stop_at:
                raise Interrupt(name)
            return step_fn()

        return real(name, ckpt, steps, step, **kwargs)

    interrupted_loop.__wrapped__ = real
    monkeypatch.setattr(stages, "run_loop", interrupted_loop)


def restore_rlhf_loops(monkeypatch) -> None:
    from fdistill.trainer.rlhf import stages

    monkeypatch.setattr(stages, "run_loop", getattr(stages.run_loop, "__wrapped__", stages.run_loop))
