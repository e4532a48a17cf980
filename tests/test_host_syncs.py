"""No host sync on the hot path: a loss call reads tensor values on the host (a device sync on a GPU)
at most once, for its input checks, whatever the number of chunks, and the Triton launchers copy
nothing from the host (their scalars are kernel arguments).

Host reads are counted by wrapping ``Tensor.item`` / ``__bool__`` / ``__int__`` / ``__float__`` /
``__index__`` / ``tolist`` / ``numpy`` and ``torch.tensor`` / ``as_tensor`` (host data to a device): on
CPU tensors they are what would be syncs on a GPU.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from utils import make_labels, make_logits

import fdistill
from fdistill._triton_dispatch import interpreter_enabled, triton_available

# Tensor methods that read values on the host, and the factories that copy host data to a device
TENSOR_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")
FACTORIES = ("tensor", "as_tensor")
needs_triton = pytest.mark.skipif(
    not (triton_available() and (interpreter_enabled() or torch.cuda.is_available())), reason="needs triton"
)


@contextlib.contextmanager
def host_reads():
    """The names of the host reads made within the block: the functions themselves are wrapped (a
    TorchFunctionMode would not see the calls made inside custom ops' Python kernels)."""
    calls = []

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in TENSOR_READS]
    saved += [(torch, n, getattr(torch, n)) for n in FACTORIES]
    try:
        for owner, name, fn in saved:
            setattr(owner, name, counted(name, fn))
        yield calls
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


class Float64Outputs(TorchDispatchMode):
    """The sizes of the float64 tensors that ops create."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.sizes.append(t.numel())
        return out


def count_reads(fn):
    with host_reads() as calls:
        fn()
    return calls


def fwd_bwd(loss_fn, *leaves):
    def run():
        loss_fn().backward()
        for x in leaves:
            x.grad = None

    return run


@pytest.mark.parametrize("free", [False, True], ids=["gpu-policy", "cpu-policy"])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_triton)])
def test_divergence_loss_reads_nothing(backend, free, seed, monkeypatch):
    """Where host reads are device syncs (a GPU: simulated by ops.host_reads_are_free -> False) a
    loss call makes none; on CPU tensors it reads the label count (so the mean's 1/N is applied in the
    forward) and checks in the backward whether the one-pass gradient needs rescaling."""
    monkeypatch.setattr(fdistill.ops, "host_reads_are_free", lambda x: free)
    student, teacher = make_logits((3, 5, 1271), torch.float32, seed=seed)
    student.requires_grad_()
    labels = make_labels((3, 5), seed)
    for divergence in ("forward_kl", "jsd", "alpha"):
        run = fwd_bwd(lambda d=divergence: fdistill.divergence_loss(student, teacher, d, labels=labels,
                                                                    backend=backend), student)  # fmt: skip
        assert sorted(count_reads(run)) == (["__bool__", "__int__"] if free else []), divergence


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("target", ["labels", "probs", "probs+reference"])
def test_fy_loss_checks_values_once(target, backend, seed):
    logits, teacher = make_logits((6, 1271), torch.float32, seed=seed)
    logits.requires_grad_()
    y = make_labels((6,), seed) if target == "labels" else teacher.softmax(-1)
    reference = torch.rand(1271).add(0.1) if target == "probs+reference" else "uniform"
    run = fwd_bwd(lambda: fdistill.fy_loss(logits, y, "alpha", alpha=1.5, reference=reference,
                                           backend=backend), logits)  # fmt: skip
    assert len(count_reads(run)) == 1
    if target != "labels":  # the rows' sums are taken in float64 without a float64 copy of the target
        with Float64Outputs() as f64:
            run()
        assert max(f64.sizes, default=0) < y.numel(), f64.sizes


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=needs_triton)])
def test_f_softargmax_reads_only_the_reference_check(backend, seed):
    logits, _ = make_logits((4, 1271), torch.float32, seed=seed)
    assert count_reads(lambda: fdistill.f_softargmax(logits, "alpha", alpha=1.5, backend=backend)) == []
    q = torch.rand(1271).add(0.1)
    assert len(count_reads(lambda: fdistill.f_softmax(logits, "js", reference=q, backend=backend))) == 1


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_fused_linear_losses_check_once_whatever_the_chunks(chunk_size, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    wt = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 300, (40,), generator=g)
    labels[::5] = -100
    dense = fwd_bwd(lambda: fdistill.fused_linear_divergence_loss(
        h, w, teacher_hidden=h.detach(), teacher_weight=wt, divergence="jsd", labels=labels,
        chunk_size=chunk_size), h, w)  # fmt: skip
    assert len(count_reads(dense)) == 1  # the labels' range
    lp, ids = torch.randn(40, 300, generator=g).log_softmax(-1).topk(8)
    topk = fwd_bwd(lambda: fdistill.fused_linear_divergence_loss(
        h, w, teacher_topk=(ids, lp), labels=labels, chunk_size=chunk_size), h, w)  # fmt: skip
    assert len(count_reads(topk)) == 1  # labels and top-k together
    probs = torch.randn(40, 300, generator=g).softmax(-1)
    fy = fwd_bwd(lambda: fdistill.fused_linear_fy_loss(h, w, probs, "alpha", chunk_size=chunk_size), h, w)
    assert len(count_reads(fy)) == 1  # the target's values, once for the batch


def test_bad_values_still_raise_after_one_read(seed):
    logits, teacher = make_logits((4, 100), torch.float32, seed=seed)
    probs = teacher.softmax(-1)
    with pytest.raises(ValueError, match="sum to 1"):
        fdistill.fy_loss(logits, probs * 1.5)
    with pytest.raises(ValueError, match="finite and non-negative"):
        fdistill.fy_loss(logits, torch.where(probs > 0.02, -probs, probs))
    with pytest.raises(ValueError, match="labels must be in"):
        fdistill.fy_loss(logits, torch.tensor([0, 1, 100, 2]))
    with pytest.raises(ValueError, match="reference must be positive"):
        fdistill.fy_loss(logits, probs, reference=torch.zeros(100))
    nan_probs = probs.clone()
    nan_probs[1, 3] = float("nan")
    with pytest.raises(ValueError, match="finite and non-negative"):
        fdistill.fy_loss(logits, nan_probs)
