"""Invalid arguments raise a clear Python exception naming the argument, never a crash."""

from __future__ import annotations

import math

import pytest
import torch
from utils import make_logits

import fdistill

fwd = torch.ops.fdistill.divergence_fwd
bwd = torch.ops.fdistill.divergence_bwd


@pytest.fixture
def logits():
    return make_logits((2, 3, 10), torch.float32, seed=7)


@pytest.mark.parametrize("backend", ["cpu", "reference", None])
def test_shape_mismatch(logits, backend):
    s, t = logits
    with pytest.raises(ValueError, match="student_logits .* teacher_logits .* same shape"):
        fdistill.divergence_loss(s, t[..., :9], backend=backend)
    with pytest.raises(ValueError, match="same shape"):
        fdistill.divergence_loss(s, t[:1], backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dtype_mismatch(logits, backend):
    s, t = logits
    with pytest.raises(TypeError, match="same dtype"):
        fdistill.divergence_loss(s, t.double(), backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        fdistill.divergence_loss(s.bfloat16(), t.half(), backend=backend)


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_logits(logits, which, dtype):
    s, t = logits
    bad = torch.zeros(2, 3, 10, dtype=dtype)
    args = (bad, t) if which == "student_logits" else (s, bad)
    with pytest.raises(TypeError, match=which):
        fdistill.divergence_loss(*args)


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
@pytest.mark.parametrize("value", [[[1.0, 2.0]], 3.0, None, "logits"], ids=["list", "float", "None", "str"])
def test_non_tensor_logits(logits, which, value):
    s, t = logits
    args = (value, t) if which == "student_logits" else (s, value)
    with pytest.raises(TypeError, match=which):
        fdistill.divergence_loss(*args)


def test_scalar_and_empty_vocab_logits():
    with pytest.raises(ValueError, match="student_logits"):
        fdistill.divergence_loss(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"V >= 1"):
        fdistill.divergence_loss(torch.zeros(3, 0), torch.zeros(3, 0))


def test_labels_wrong_shape(logits):
    s, t = logits
    for labels in (
        torch.zeros(2, 4, dtype=torch.long),
        torch.zeros(6, dtype=torch.long),
        torch.zeros(2, 3, 10),
    ):
        with pytest.raises((ValueError, TypeError), match="labels"):
            fdistill.divergence_loss(s, t, labels=labels)
    with pytest.raises(ValueError, match="labels"):
        fdistill.divergence_loss(s, t, labels=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool, torch.complex64])
def test_labels_not_integer(logits, dtype):
    s, t = logits
    with pytest.raises(TypeError, match="labels"):
        fdistill.divergence_loss(s, t, labels=torch.zeros(2, 3, dtype=dtype))


def test_labels_not_a_tensor(logits):
    s, t = logits
    with pytest.raises(TypeError, match="labels"):
        fdistill.divergence_loss(s, t, labels=[[0, 1, 2], [0, 1, 2]])


@pytest.mark.parametrize("name", ["kl", "KL", "forward-kl", "", "js"])
def test_unknown_divergence(logits, name):
    s, t = logits
    with pytest.raises(ValueError, match="divergence"):
        fdistill.divergence_loss(s, t, name)


@pytest.mark.parametrize("divergence", ["jeffreys", "jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, math.inf])
def test_weight_outside_unit_interval(logits, divergence, value):
    s, t = logits
    name = "beta" if divergence in ("jeffreys", "jsd") else "skew"
    with pytest.raises(ValueError, match=name):
        fdistill.divergence_loss(s, t, divergence, **{name: value})


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, math.nan, math.inf])
def test_alpha_excluded_values(logits, value):
    s, t = logits
    with pytest.raises(ValueError, match="alpha"):
        fdistill.divergence_loss(s, t, "alpha", alpha=value)


@pytest.mark.parametrize("name", ["beta", "skew", "alpha", "temperature"])
@pytest.mark.parametrize(
    "value", ["0.5", None, True, torch.tensor(0.5)], ids=["str", "None", "bool", "tensor"]
)
def test_non_real_scalars(logits, name, value):
    s, t = logits
    with pytest.raises(TypeError, match=name):
        fdistill.divergence_loss(s, t, "alpha", **{name: value})


@pytest.mark.parametrize("value", [0.0, -1.0, -1e-9, math.inf, math.nan])
def test_temperature_not_positive_finite(logits, value):
    s, t = logits
    with pytest.raises(ValueError, match="temperature"):
        fdistill.divergence_loss(s, t, temperature=value)


@pytest.mark.parametrize("reduction", ["batchmean", "MEAN", "", None])
def test_bad_reduction(logits, reduction):
    s, t = logits
    with pytest.raises(ValueError, match="reduction"):
        fdistill.divergence_loss(s, t, reduction=reduction)


# backend="triton" on CPU tensors without the interpreter: test_triton.py (in a subprocess)
@pytest.mark.parametrize("backend", ["cuda", "CPU", ""])
def test_bad_backend(logits, backend):
    s, t = logits
    with pytest.raises(ValueError, match="backend"):
        fdistill.divergence_loss(s, t, backend=backend)


def test_ignore_index_not_int(logits):
    s, t = logits
    with pytest.raises(TypeError, match="ignore_index"):
        fdistill.divergence_loss(s, t, ignore_index=-100.0)


@pytest.mark.parametrize("backend", ["cpu", "reference", None])
def test_teacher_requires_grad(logits, backend):
    s, t = logits
    with pytest.raises(ValueError, match="teacher_logits"):
        fdistill.divergence_loss(s, t.requires_grad_(True), backend=backend)


def test_module_validates_at_call(logits):
    s, t = logits
    with pytest.raises(ValueError, match="beta"):
        fdistill.DivergenceLoss("jsd", beta=2.0)(s, t)


# ----------------------------------------------------------------------------- the raw ops


def _ok_args(dtype=torch.float32):
    s, t = make_logits((4, 12), dtype, seed=3)
    return s, t


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda s, t, lab: (s, t[:, :11], lab), ValueError, "shapes differ"),
        (lambda s, t, lab: (s, t[:3], lab), ValueError, "shapes differ"),
        (lambda s, t, lab: (s[0], t[0], None), ValueError, r"\[rows, vocab\]"),
        (lambda s, t, lab: (s.unsqueeze(0), t.unsqueeze(0), None), ValueError, r"\[rows, vocab\]"),
        (lambda s, t, lab: (s, t.double(), lab), TypeError, "dtypes differ"),
        (lambda s, t, lab: (s.long(), t.long(), lab), TypeError, "float32, float64"),
        (lambda s, t, lab: (s.t(), t.t(), None), ValueError, "unit stride"),
        (lambda s, t, lab: (s, t, lab[:3]), ValueError, "labels"),
        (lambda s, t, lab: (s, t, lab.int()), TypeError, "labels must be int64"),
        (lambda s, t, lab: (s, t, lab.float()), TypeError, "labels must be int64"),
        (lambda s, t, lab: (s, t, torch.stack([lab, lab], 1)[:, 0]), ValueError, "contiguous"),
    ],
    ids=[
        "vocab",
        "rows",
        "1d",
        "3d",
        "dtype",
        "int-logits",
        "stride",
        "labels-shape",
        "labels-int32",
        "labels-float",
        "labels-strided",
    ],
)
def test_raw_forward_rejects_bad_tensors(mutate, error, match):
    s, t = _ok_args()
    labels = torch.tensor([0, -100, 2, 3])
    args = mutate(s, t, labels)
    with pytest.raises(error, match=match):
        fwd(*args, "forward_kl", 0.0, 1.0, -100)


@pytest.mark.parametrize(
    ("divergence", "param", "temperature", "match"),
    [
        ("nope", 0.0, 1.0, "unknown divergence"),
        ("jsd", 1.5, 1.0, "weight must be in"),
        ("skew_kl", -0.1, 1.0, "weight must be in"),
        ("jeffreys", math.nan, 1.0, "weight must be in"),
        ("alpha", 1.0, 1.0, "alpha"),
        ("alpha", 0.0, 1.0, "alpha"),
        ("alpha", math.inf, 1.0, "alpha"),
        ("tv", 0.0, 0.0, "temperature"),
        ("tv", 0.0, -2.0, "temperature"),
        ("tv", 0.0, math.nan, "temperature"),
        ("tv", 0.0, math.inf, "temperature"),
    ],
)
def test_raw_forward_rejects_bad_scalars(divergence, param, temperature, match):
    s, t = _ok_args()
    with pytest.raises(ValueError, match=match):
        fwd(s, t, None, divergence, param, temperature, -100)


def test_raw_backward_rejects_bad_tensors():
    s, t = _ok_args()
    _, stats = fwd(s, t, None, "jsd", 0.5, 1.0, -100)
    g = torch.ones(4)
    with pytest.raises(ValueError, match="grad_loss"):
        bwd(torch.ones(3), s, t, None, stats, "jsd", 0.5, 1.0, -100)
    with pytest.raises(ValueError, match="stats"):
        bwd(g, s, t, None, stats[:3], "jsd", 0.5, 1.0, -100)
    with pytest.raises(ValueError, match="stats"):
        bwd(g, s, t, None, stats[:, :3], "jsd", 0.5, 1.0, -100)
    with pytest.raises(ValueError, match="stats"):
        bwd(g, s, t, None, stats.t().contiguous().t(), "jsd", 0.5, 1.0, -100)
    with pytest.raises(TypeError, match="stats must be"):
        bwd(g, s, t, None, stats.double(), "jsd", 0.5, 1.0, -100)
    with pytest.raises(ValueError, match="shapes differ"):
        bwd(g, s, t[:, :5], None, stats, "jsd", 0.5, 1.0, -100)
    with pytest.raises(ValueError, match="unknown divergence"):
        bwd(g, s, t, None, stats, "nope", 0.5, 1.0, -100)
