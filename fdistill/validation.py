"""Every argument check of the public API, written once: dtypes, shapes, devices, labels, options,
probability targets, reference measures, LM heads and top-k teachers. Each raises a clear exception
naming the argument; value checks (labels in range, probabilities on the simplex) go through
:class:`ValueChecks` (one host sync per call, see :mod:`fdistill._value_checks`).

Used by :mod:`fdistill.losses`, :mod:`fdistill.fdiv`, :mod:`fdistill.fused_linear`,
:mod:`fdistill.vocab_parallel` and :mod:`fdistill.compat`; it imports none of them.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._value_checks import (
    ValueChecks,
    label_out_of_range,
    not_finite_or_negative,
    off_simplex,
    rows_off_simplex,
)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
REFERENCES = ("uniform", "unit")
MAX_SWEEPS = 2**31 - 1  # the f-divergence kernels' sweep counter is a 32-bit int


# ----------------------------------------------------------------------------- scalars and options


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_real(name: str, value, low=None, high=None) -> float:
    """``value`` as a float: a finite real number (not a bool), in ``[low, high]`` where given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return float(value)


def check_int(name: str, value) -> int:
    """``value`` as an int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_ignore_index(ignore_index) -> int:
    return check_int("ignore_index", ignore_index)


def check_n_iter(n_iter) -> None:
    """The most sweeps of the f-divergence tau search: None or an int in [1, MAX_SWEEPS]."""
    if n_iter is not None and (
        isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral) or not 1 <= n_iter <= MAX_SWEEPS
    ):
        raise ValueError(f"n_iter must be None or an int in [1, {MAX_SWEEPS}], got {n_iter!r}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


# The kernels divide by T as a multiplication by 1/T in float32 (the accumulation dtype of every
# input dtype but float64): a smaller T would make 1/T infinite and every loss NaN.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def check_temperature(temperature) -> None:
    check_real("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:.3g} (1/T must be finite in float32), got {temperature}"
        )


def divergence_param(divergence: str, *, beta, skew, alpha) -> float:
    """The one scalar the divergence uses, validated."""
    for name, value in (("beta", beta), ("skew", skew), ("alpha", alpha)):
        check_real(name, value)
    for name, value in (("beta", beta), ("skew", skew)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if alpha in (0, 1):
        raise ValueError(
            f"alpha must not be 0 or 1 (those limits are reverse_kl and forward_kl), got {alpha}"
        )
    if divergence in ("jeffreys", "jsd"):
        return float(beta)
    if divergence in ("skew_kl", "skew_reverse_kl"):
        return float(skew)
    if divergence == "alpha":
        return float(alpha)
    return 0.0


def check_teacher_grad(teacher, grad_teacher: bool, name: str = "teacher_logits") -> None:
    if teacher.requires_grad and not grad_teacher:
        raise ValueError(
            f"{name} requires grad, but fdistill does not backpropagate into the teacher by "
            f"default: pass {name}.detach(), or grad_teacher=True to differentiate through it"
        )


# ----------------------------------------------------------------------------- logits and labels


def check_logits_tensor(name: str, x, vocab: str = "V") -> None:
    """A floating tensor of shape ``(..., vocab)`` with at least one vocabulary entry."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., {vocab}) with {vocab} >= 1, got {tuple(x.shape)}")


def check_logits(student, teacher) -> None:
    check_logits_tensor("student_logits", student)
    check_logits_tensor("teacher_logits", teacher)
    check_same_shape_and_device("student_logits", student, "teacher_logits", teacher)
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"student_logits ({student.dtype}) and teacher_logits ({teacher.dtype}) must have the same dtype"
        )


def check_same_shape_and_device(a_name: str, a, b_name: str, b) -> None:
    """Two tensors of one shape on one device (the pair of logits of a loss)."""
    if a.shape != b.shape:
        raise ValueError(f"{a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} must have the same shape")
    if a.device != b.device:
        raise ValueError(f"{a_name} ({a.device}) and {b_name} ({b.device}) are on different devices")


def check_labels(labels, student) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' shape without the vocabulary "
            f"dimension, {tuple(student.shape[:-1])}"
        )
    if labels.device != student.device:
        raise ValueError(f"labels ({labels.device}) and logits ({student.device}) are on different devices")
    return labels


def check_no_vocab_size(vocab_size) -> None:
    if vocab_size is not None:
        raise ValueError(
            "vocab_size is only used with vocab_parallel_group (the sum of the vocabulary shards)"
        )


# ----------------------------------------------------------------------------- f-divergence targets


def check_reference(reference, logits, dim, checks: ValueChecks) -> None:
    if isinstance(reference, str):
        check_choice("reference", reference, REFERENCES)
        return
    if not isinstance(reference, torch.Tensor):
        raise TypeError(f"reference must be 'uniform', 'unit' or a tensor, got {type(reference).__name__}")
    if not reference.dtype.is_floating_point:
        raise TypeError(f"reference must be a floating tensor, got {reference.dtype}")
    if reference.device != logits.device:
        raise ValueError(
            f"reference ({reference.device}) and logits ({logits.device}) are on different devices"
        )
    moved = logits.movedim(dim, -1).shape
    candidate = reference.movedim(dim, -1) if reference.dim() == logits.dim() else reference
    try:
        torch.broadcast_shapes(candidate.shape, moved)
        ok = torch.broadcast_shapes(candidate.shape, moved) == moved
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"reference of shape {tuple(reference.shape)} does not broadcast to the logits' shape "
            f"{tuple(logits.shape)} (vocabulary dimension {dim})"
        )
    check_reference_values(reference, checks)


def check_reference_values(reference: torch.Tensor, checks: ValueChecks) -> None:
    """A reference measure tensor: positive and finite everywhere (added to ``checks``)."""
    if checks.active():
        checks.add(
            not_finite_or_negative(reference, positive=True),
            lambda: ValueError(
                "reference must be positive and finite everywhere (a reference measure q_j > 0)"
            ),
        )


def check_target(target, logits, ignore_index, *, shard=False, checks: ValueChecks | None = None):
    """(labels [rows] int64 or None, probabilities [rows, V] or None), validated: the value checks go
    to ``checks`` (raised by the caller, one sync for all) or are raised here when it is None. With
    ``shard`` the logits are one rank's vocabulary shard: the label range and the probability rows'
    sums concern the whole vocabulary and are checked by the caller (:mod:`fdistill.vocab_parallel`)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            f"target must be a torch.Tensor (labels or probabilities), got {type(target).__name__}"
        )
    if target.device != logits.device:
        raise ValueError(f"target ({target.device}) and logits ({logits.device}) are on different devices")
    own = checks is None
    checks = ValueChecks() if own else checks
    vocab = logits.shape[-1]
    labels = probs = None
    if target.dtype.is_floating_point:
        if target.shape != logits.shape:
            raise ValueError(
                f"probability target {tuple(target.shape)} must have the logits' shape {tuple(logits.shape)}"
            )
        if target.requires_grad:
            raise ValueError("target requires grad, but the FY loss gives it none: pass target.detach()")
        probs = target.reshape(-1, vocab)
        probs = probs if probs.stride(-1) == 1 else probs.contiguous()
        if checks.active():
            check_probabilities(probs, checks, sums=not shard)
    else:
        if target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must be integer labels or floating probabilities, got {target.dtype}")
        if target.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels {tuple(target.shape)} must have the logits' shape without the vocabulary "
                f"dimension, {tuple(logits.shape[:-1])}"
            )
        labels = target.reshape(-1).long().contiguous()
        if not shard and checks.active():  # (out-of-range labels still give a NaN loss in the kernels)
            checks.add(
                label_out_of_range(labels, vocab, ignore_index),
                lambda: ValueError(f"labels must be in [0, {vocab}) or ignore_index ({ignore_index})"),
            )
    if own:
        checks.raise_first()
    return labels, probs


def check_probabilities(probs: torch.Tensor, checks: ValueChecks, *, sums: bool = True) -> None:
    """Probability-target rows ``[rows, V]``: finite, non-negative and (``sums``) summing to 1 within
    1e-4 (2e-2 for fp16 / bf16 targets), added to ``checks``."""
    checks.add(
        not_finite_or_negative(probs),
        lambda: ValueError("probability target must be finite and non-negative"),
    )
    if sums:
        tol = 1e-4 if probs.dtype in (torch.float32, torch.float64) else 2e-2

        def error():
            count = int(off_simplex(probs, tol).sum())
            return ValueError(f"probability target rows must sum to 1 (within {tol}); {count} do not")

        checks.add(rows_off_simplex(probs, tol), error)


# ----------------------------------------------------------------------------- LM heads and top-k


def check_float(name, x, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, the hidden states on {device}")


def check_head(who, hidden, weight, bias, softcap):
    """(hidden as [N, H], weight, bias) of one LM head, validated."""
    p = f"{who}_" if who else ""
    if hidden is None or weight is None:
        raise ValueError(f"{p}hidden and {p}weight go together (the {who or 'LM'} head)".replace("  ", " "))
    check_float(f"{p}hidden", hidden)
    check_float(f"{p}weight", weight, hidden.device)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"{p}weight must be (V, H) with V >= 1 and H = {p}hidden.shape[-1]; got {p}hidden "
            f"{tuple(hidden.shape)} and {p}weight {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(
            f"{p}hidden ({hidden.dtype}) and {p}weight ({weight.dtype}) must have the same dtype "
            "(or run under torch.autocast)"
        )
    if bias is not None:
        check_float(f"{p}bias", bias, hidden.device)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{p}bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{p}bias ({bias.dtype}) and {p}weight ({weight.dtype}) must have the same dtype")
    if softcap is not None:
        name = "teacher_softcap" if who == "teacher" else "softcap"
        check_real(name, softcap)
        if not softcap > 0:
            raise ValueError(f"{name} must be None or > 0, got {softcap}")
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias


def check_token_ids(labels, lead, vocab, ignore_index, device, checks: ValueChecks | None = None,
                     name="labels"):  # fmt: skip
    """``labels`` flattened to int64 ``[N]`` (or None), each in [0, vocab) or ``ignore_index`` (a value
    check added to ``checks``; made at once when it is None)."""
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(
            f"{name} {tuple(labels.shape)} must have the hidden states' token shape {tuple(lead)}"
        )
    if labels.device != device:
        raise ValueError(
            f"{name} ({labels.device}) and the hidden states ({device}) are on different devices"
        )
    flat = labels.reshape(-1).long().contiguous()
    own = checks is None
    checks = ValueChecks() if own else checks
    if checks.active():
        message = f"{name} must be in [0, {vocab}) or ignore_index ({ignore_index})"
        checks.add(label_out_of_range(flat, vocab, ignore_index), lambda: ValueError(message))
    if own:
        checks.raise_first()
    return flat


def check_topk(topk, lead, device, name="teacher_topk", other="the hidden states"):
    """The pair ``(indices, logprobs)`` of a top-k teacher: an integer and a float tensor of the same
    shape ``(*lead, k)`` with k >= 1, on ``device`` (that of ``other``)."""
    if not (isinstance(topk, (tuple, list)) and len(topk) == 2):
        raise TypeError(f"{name} must be a pair (indices, logprobs), got {type(topk).__name__}")
    indices, logprobs = topk
    if (
        not isinstance(indices, torch.Tensor)
        or indices.dtype.is_floating_point
        or indices.dtype.is_complex
        or indices.dtype == torch.bool
    ):
        raise TypeError(f"{name} indices must be an integer tensor")
    check_float(f"{name} logprobs", logprobs)
    for what, x in (("indices", indices), ("logprobs", logprobs)):
        if x.device != device:
            raise ValueError(f"{name} {what} are on {x.device}, {other} on {device}")
    if (
        indices.shape != logprobs.shape
        or indices.dim() < 1
        or indices.shape[:-1] != lead
        or indices.shape[-1] < 1
    ):
        raise ValueError(
            f"{name} indices {tuple(indices.shape)} and logprobs {tuple(logprobs.shape)} must both be "
            f"(..., k) with ... = {tuple(lead)} and k >= 1"
        )
    return indices, logprobs


def check_topk_values(indices, logprobs, vocab, vocab_mismatch, topk_tail, checks: ValueChecks,
                      name="teacher_topk") -> None:  # fmt: skip
    """Ids in ``[0, vocab)`` (larger ones dropped under ``vocab_mismatch="mask"``) and distinct within
    a token; log-probabilities ``<= 0`` or ``-inf`` (no NaN, no ``+inf``), at least one finite per
    token; for the bucket, top-k mass at most 1. ``[N, k]`` tensors, ignored tokens already replaced
    by a placeholder."""
    if not checks.active():
        return
    checks.add((indices < 0).any(), lambda: ValueError(f"{name} indices must be >= 0"))
    if vocab_mismatch == "error":
        message = f"{name} indices must be < V = {vocab} (or vocab_mismatch='mask' to drop larger ids)"
        checks.add((indices >= vocab).any(), lambda: ValueError(message))
    flat = indices.reshape(-1, indices.shape[-1])
    if flat.shape[-1] > 1:
        checks.add((flat.sort(-1).values.diff(dim=-1) == 0).any(),
                   lambda: ValueError(f"{name} indices must be distinct within each token"))  # fmt: skip
    if logprobs.numel():
        hi = logprobs.amax()  # NaN propagates
        checks.add(~(hi <= 1e-4), lambda: ValueError(
            f"{name} logprobs must be log-probabilities (<= 0, or -inf), without NaN or +inf"))  # fmt: skip
        checks.add((logprobs.amax(-1) == -math.inf).any(), lambda: ValueError(
            f"{name} logprobs are all -inf at some token (no teacher mass there): give it a finite "
            "log-probability or ignore the token through labels"))  # fmt: skip
    if topk_tail == "bucket":
        mass = logprobs.exp().sum(-1, dtype=torch.float64)
        checks.add((mass > 1 + 1e-3).any(), lambda: ValueError(
            f"{name} probabilities must sum to at most 1 for topk_tail='bucket'"))  # fmt: skip
