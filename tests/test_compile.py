"""torch.compile of a training step that calls the fused losses: one graph, no graph break, and the
compiled loss and gradients equal the eager ones (CPU kernels).

Each step is a small LM head on hidden states: the student's logits ``h @ W^T`` (or its head handed
to a fused-linear loss) against a frozen teacher. ``torch._dynamo.explain`` counts the graph breaks,
and ``fullgraph=True`` would raise on one; the ``aot_eager`` backend traces the forward and the
backward exactly as inductor would, without generating code, so these tests stay fast. One test
compiles with inductor (C++ code generation), marked ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close_verbose, generator, randn

import fdistill

pytestmark = pytest.mark.skipif(not fdistill.has_cpu_kernels(), reason="needs the C++ CPU kernels")

BATCH, SEQ, HIDDEN, VOCAB = 2, 7, 24, 97
IGNORE = -100


def make_step_inputs(seed: int, vocab: int = VOCAB, seq: int = SEQ):
    """hidden (B, S, H), student head (V, H) and bias, teacher head (V, H), labels (B, S) with some
    ignored tokens; the head and hidden states are the leaves that get gradients."""
    hidden = randn((BATCH, seq, HIDDEN), seed)
    weight = randn((vocab, HIDDEN), seed + 1) * 0.4
    bias = randn((vocab,), seed + 2) * 0.1
    teacher_weight = randn((vocab, HIDDEN), seed + 3) * 0.4
    labels = torch.randint(0, vocab, (BATCH, seq), generator=generator(seed + 4))
    labels[0, :2] = IGNORE
    labels[1, -1] = IGNORE
    return hidden, weight, bias, teacher_weight, labels


def run_step(step, inputs):
    """(loss, grads of hidden, weight and bias) of ``step(hidden, weight, bias, teacher_weight,
    labels)`` on fresh leaves."""
    hidden, weight, bias, teacher_weight, labels = inputs
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    loss = step(*leaves, teacher_weight, labels)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def assert_compiles_like_eager(step, seed, backend="aot_eager", inputs=None, rtol=1e-5):
    """No graph break in ``step``; its compiled loss and gradients equal the eager ones."""
    inputs = inputs if inputs is not None else make_step_inputs(seed)
    explanation = torch._dynamo.explain(step)(*_leaves(inputs))
    reasons = [b.reason for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    c_loss, c_grads = run_step(compiled, inputs)
    e_loss, e_grads = run_step(step, inputs)
    assert torch.isfinite(e_loss).all()
    assert_close_verbose(c_loss, e_loss, 1e-6, rtol, "loss compiled vs eager")
    for name, c, e in zip(("hidden", "weight", "bias"), c_grads, e_grads, strict=True):
        assert c is not None and e is not None, name
        assert_close_verbose(c, e, 1e-6, rtol, f"{name}.grad compiled vs eager")
    return compiled


def _leaves(inputs):
    hidden, weight, bias, teacher_weight, labels = inputs
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    return (*leaves, teacher_weight, labels)


def _logits(hidden, weight, bias, teacher_weight):
    student = torch.nn.functional.linear(hidden, weight, bias)
    with torch.no_grad():
        teacher = hidden @ teacher_weight.T
    return student, teacher


# ----------------------------------------------------------------------------- divergence_loss


@pytest.mark.parametrize(
    ("divergence", "options"),
    [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("reverse_kl", {"temperature": 2.0})],
    ids=["forward_kl", "jsd-beta0.3", "reverse_kl-T2"],
)
def test_divergence_loss_step(divergence, options, fresh_dynamo, seed):
    def step(hidden, weight, bias, teacher_weight, labels):
        student, teacher = _logits(hidden, weight, bias, teacher_weight)
        return fdistill.divergence_loss(
            student, teacher, divergence, **options, labels=labels, ignore_index=IGNORE, reduction="mean"
        )

    assert_compiles_like_eager(step, seed)


def test_several_divergences_and_cross_entropy_in_one_step(fresh_dynamo, seed):
    """A distillation objective mixing the losses (and the grad_in_place kernels) in one graph."""

    def step(hidden, weight, bias, teacher_weight, labels):
        student, teacher = _logits(hidden, weight, bias, teacher_weight)
        kl = fdistill.divergence_loss(student, teacher, "forward_kl", labels=labels)
        jsd = fdistill.divergence_loss(student, teacher, "jsd", beta=0.7, labels=labels, temperature=1.5)
        ce = torch.nn.functional.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        rows = fdistill.divergence_loss(student * 1.0, teacher, "reverse_kl", reduction="none",
                                        grad_in_place=True)  # fmt: skip
        return kl + 0.5 * jsd + 0.1 * ce + rows.mean()

    assert_compiles_like_eager(step, seed)


# ----------------------------------------------------------------------------- fy_loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fy_loss_step(reduction, fresh_dynamo, seed):
    def step(hidden, weight, bias, teacher_weight, labels):
        student, _ = _logits(hidden, weight, bias, teacher_weight)
        return fdistill.fy_loss(student, labels, "alpha", alpha=1.5, ignore_index=IGNORE, reduction=reduction)

    assert_compiles_like_eager(step, seed)


def test_fy_loss_probability_target_step(fresh_dynamo, seed):
    """Distillation with the FY loss: the teacher's f-softargmax as the target (its value checks are
    skipped while tracing)."""

    def step(hidden, weight, bias, teacher_weight, labels):
        student, teacher = _logits(hidden, weight, bias, teacher_weight)
        target = fdistill.f_softargmax(teacher, "alpha", alpha=1.5)
        return fdistill.fy_loss(student, target, "alpha", alpha=1.5)

    assert_compiles_like_eager(step, seed)


# ----------------------------------------------------------------------------- fused-linear losses

# chunk_size 4 splits the 14 tokens into 4 chunks, the last one short
FUSED_CASES = {
    "teacher_head-forward_kl": dict(teacher="head", divergence="forward_kl"),
    "teacher_head-jsd-softcap-hard": dict(
        teacher="head", divergence="jsd", beta=0.3, softcap=5.0, teacher_softcap=6.0, hard_loss_weight=0.5
    ),  # fmt: skip
    "teacher_logits-reverse_kl-T2": dict(teacher="logits", divergence="reverse_kl", temperature=2.0),
    "teacher_topk-bucket": dict(teacher="topk", divergence="forward_kl", topk_tail="bucket"),
}


def _fused_step(case: dict, reduction="mean", chunk_size=4):
    case = dict(case)
    teacher_kind = case.pop("teacher")

    def step(hidden, weight, bias, teacher_weight, labels):
        if teacher_kind == "head":
            teacher = dict(teacher_hidden=hidden.detach(), teacher_weight=teacher_weight)
        elif teacher_kind == "logits":
            teacher = dict(teacher_logits=(hidden @ teacher_weight.T).detach())
        else:
            logprobs = (hidden @ teacher_weight.T).detach().log_softmax(-1)
            top = logprobs.topk(5, dim=-1)
            teacher = dict(teacher_topk=(top.indices, top.values))
        loss = fdistill.fused_linear_divergence_loss(
            hidden, weight, student_bias=bias, **teacher, labels=labels, ignore_index=IGNORE,
            reduction=reduction, chunk_size=chunk_size, **case,
        )  # fmt: skip
        return loss if reduction != "none" else (loss * torch.linspace(0.5, 1.5, loss.shape[-1])).sum()

    return step


@pytest.mark.parametrize("case", list(FUSED_CASES.values()), ids=list(FUSED_CASES))
def test_fused_linear_divergence_step(case, fresh_dynamo, seed):
    assert_compiles_like_eager(_fused_step(case), seed)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_linear_divergence_reductions(reduction, fresh_dynamo, seed):
    assert_compiles_like_eager(_fused_step(FUSED_CASES["teacher_head-forward_kl"], reduction), seed)


def test_fused_linear_default_chunk_size(fresh_dynamo, seed):
    """One chunk (the default chunk size is larger than the batch)."""
    step = _fused_step(FUSED_CASES["teacher_logits-reverse_kl-T2"], chunk_size=None)
    assert_compiles_like_eager(step, seed)


def test_fused_linear_fy_step(fresh_dynamo, seed):
    def step(hidden, weight, bias, teacher_weight, labels):
        return fdistill.fused_linear_fy_loss(hidden, weight, labels, "alpha", bias=bias, alpha=1.5,
                                             ignore_index=IGNORE, chunk_size=5)  # fmt: skip

    assert_compiles_like_eager(step, seed)


def test_fused_linear_no_bias_float64(fresh_dynamo, seed):
    hidden, weight, _, teacher_weight, labels = make_step_inputs(seed)
    hidden, weight, teacher_weight = hidden.double(), weight.double(), teacher_weight.double()

    def step(hidden, weight):
        return fdistill.fused_linear_divergence_loss(hidden, weight, teacher_hidden=hidden.detach(),
                                                     teacher_weight=teacher_weight, labels=labels,
                                                     divergence="jsd", beta=0.5, chunk_size=3)  # fmt: skip

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, step):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for what, c, e in zip(("loss", "hidden.grad", "weight.grad"), *results, strict=True):
        assert c.dtype == torch.float64, what
        assert_close_verbose(c, e, 1e-12, 1e-10, f"{what} compiled vs eager")


def test_fused_linear_all_tokens_ignored(fresh_dynamo, seed):
    """``mean`` over no token is 0 with zero gradient, compiled as eagerly (no data-dependent branch)."""
    hidden, weight, bias, teacher_weight, labels = make_step_inputs(seed)
    inputs = (hidden, weight, bias, teacher_weight, torch.full_like(labels, IGNORE))
    step = _fused_step(FUSED_CASES["teacher_head-forward_kl"])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, grads = run_step(compiled, inputs)
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads)


def test_compiled_fused_step_reused_on_new_values(fresh_dynamo, seed):
    """The compiled graph reads the tensors of each call (nothing of the first call is baked in)."""
    step = _fused_step(FUSED_CASES["teacher_logits-reverse_kl-T2"])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for i in range(3):
        inputs = make_step_inputs(seed + 10 * i)
        c_loss, c_grads = run_step(compiled, inputs)
        e_loss, e_grads = run_step(step, inputs)
        assert_close_verbose(c_loss, e_loss, 1e-6, 1e-5, f"loss, call {i}")
        assert_close_verbose(c_grads[1], e_grads[1], 1e-6, 1e-5, f"weight.grad, call {i}")


def test_eager_validation_still_raises():
    """Value checks skipped while tracing still run eagerly."""
    hidden, weight, bias, teacher_weight, labels = make_step_inputs(0)
    labels[0, 3] = VOCAB
    with pytest.raises(ValueError, match="labels must be in"):
        fdistill.fused_linear_divergence_loss(hidden, weight, teacher_hidden=hidden,
                                              teacher_weight=teacher_weight, labels=labels)  # fmt: skip


def test_what_compile_does_with_bad_values(fresh_dynamo, seed):
    """Under torch.compile the value checks are skipped (values cannot be read while tracing), as the
    README states: a label >= V gives that token a NaN FY loss (the kernels' rule, never a silent
    finite value), and an unnormalised probability target is used as given (the same loss as eager
    on the same target with the sums check off). Eager raises for both."""
    logits = randn((5, VOCAB), seed)
    labels = torch.randint(0, VOCAB, (5,), generator=generator(seed + 1))
    labels[2] = VOCAB
    with pytest.raises(ValueError, match="labels must be in"):
        fdistill.fy_loss(logits, labels, "alpha", alpha=1.5, reduction="none")
    compiled = torch.compile(lambda x, y: fdistill.fy_loss(x, y, "alpha", alpha=1.5, reduction="none"),
                             backend="aot_eager", fullgraph=True)  # fmt: skip
    rows = compiled(logits, labels)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[torch.arange(5) != 2]).all()

    target = torch.softmax(randn((5, VOCAB), seed + 2), -1) * 1.5  # rows sum to 1.5
    with pytest.raises(ValueError, match="sum to 1"):
        fdistill.fy_loss(logits, target, "kl", reduction="none")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: fdistill.fy_loss(x, y, "kl", reduction="none"),
                             backend="aot_eager", fullgraph=True)  # fmt: skip
    got = compiled(logits, target)
    normalised = fdistill.fy_loss(logits, target / 1.5, "kl", reduction="none")
    assert torch.isfinite(got).all() and not torch.allclose(got, normalised)  # used as given


# ----------------------------------------------------------------------------- inductor


@pytest.mark.slow
def test_inductor_fused_linear_and_divergence_step(fresh_dynamo, seed):
    """The default backend (inductor, C++ code generation on the CPU) on a step with both kinds of loss.

    Slow: inductor compiles C++ for the forward and the backward (tens of seconds on a CPU core).
    """
    fused = _fused_step(FUSED_CASES["teacher_head-forward_kl"])

    def step(hidden, weight, bias, teacher_weight, labels):
        student, teacher = _logits(hidden, weight, bias, teacher_weight)
        return fused(hidden, weight, bias, teacher_weight, labels) + fdistill.divergence_loss(
            student, teacher, "jsd", beta=0.3, labels=labels
        )

    assert_compiles_like_eager(step, seed, backend="inductor", rtol=1e-4)
