"""Distillation between two Hugging Face causal LMs with the fused LM-head loss.

:func:`causal_lm_distillation_loss` runs the student's and the teacher's backbones (``model.base_model``) to
their final hidden states and hands them, with each model's ``lm_head`` weight (and bias), to
:func:`fdistill.fused_linear_divergence_loss`, so the ``(tokens x V)`` logits of either model are never
materialised. ``fused=False`` computes the same loss from the models' own logits with
:func:`fdistill.divergence_loss` (the reference, and the path for models whose head is not a plain linear
layer).

The models are duck-typed: anything with ``base_model`` (returning ``last_hidden_state``),
``get_output_embeddings()`` and ``config`` works, so this module does not import ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fused_linear import fused_linear_divergence_loss
from ..losses import divergence_loss

__all__ = ["LMHeadSpec", "causal_lm_distillation_loss", "final_hidden_states", "lm_head_of"]


@dataclass
class LMHeadSpec:
    """What turns a model's final hidden state into its logits: ``softcap(scale * (h @ weight.T + bias))``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_head_of(model) -> LMHeadSpec:
    """The LM head of a causal LM: ``get_output_embeddings()``'s weight and bias (the input embedding when
    the embeddings are tied, since it is the same parameter), the config's logit multiplier (Cohere's
    ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, Granite's ``logits_scaling`` divisor --
    a multiplier for HyperCLOVA X) and its
    ``final_logit_softcapping`` (Gemma 2/3)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (get_output_embeddings())")
    config = _text_config(model)
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):  # Muse Glimmer, Falcon-H1: multipliers too
        if scale is None:
            scale = getattr(config, name, None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        # Granite / MiniCPM3 divide by it, HyperCLOVA X multiplies by it
        multiplies = getattr(config, "model_type", None) == "hyperclovax"
        scale = config.logits_scaling if multiplies else 1.0 / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMHeadSpec(
        head.weight, getattr(head, "bias", None), 1.0 if scale is None else float(scale), softcap
    )


def final_hidden_states(model, input_ids, attention_mask=None, **model_kwargs) -> torch.Tensor:
    """``(B, T, H)`` input of the model's LM head (after the final norm), from ``model.base_model``."""
    backbone = model.base_model
    if backbone is model:
        raise ValueError(f"{type(model).__name__}.base_model is the model itself: cannot skip its LM head")
    model_kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _targets(input_ids, attention_mask, labels, ignore_index):
    """Next-token targets ``(B, T - 1)``: ``labels`` (default ``input_ids``) shifted left by one, with the
    padding (``attention_mask == 0``) set to ``ignore_index``."""
    targets = (input_ids if labels is None else labels).clone()
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask == 0, ignore_index)
    return targets[:, 1:]


def causal_lm_distillation_loss(
    student,
    teacher,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    fused: bool = True,
    ignore_index: int = -100,
    model_kwargs: dict | None = None,
    **loss_options,
) -> torch.Tensor:
    """Token-level distillation loss of ``student`` towards ``teacher`` (two causal LMs, same vocabulary).

    Position ``i`` of both models predicts token ``i + 1``; a position contributes when its target
    (``labels[:, i + 1]``, default ``input_ids[:, i + 1]``) is not ``ignore_index`` and is not padding
    (``attention_mask == 0``). Use ``labels`` with ``-100`` on the prompt to distil the completions only
    (the convention of Transformers and TRL).

    Args:
        student, teacher: causal LMs (e.g. ``AutoModelForCausalLM``); the teacher runs under
            ``torch.no_grad()`` and in whatever train/eval mode it is in (call ``teacher.eval()``).
        input_ids, attention_mask, labels: ``(B, T)``, as for the models' forward.
        divergence: as :func:`fdistill.divergence_loss` (``"jsd"`` with ``beta`` for GKD).
        fused: ``True`` (default) computes the loss from the backbones' hidden states and the LM heads
            chunk by chunk (:func:`fdistill.fused_linear_divergence_loss`; the head's bias, logit scale
            and ``final_logit_softcapping`` are applied as the model does). ``False`` calls the models'
            forward and :func:`fdistill.divergence_loss` on the logits (reference path).
        ignore_index: the label of positions without a loss.
        model_kwargs: extra keyword arguments for both models' forward (e.g. ``position_ids``).
        **loss_options: ``beta``, ``skew``, ``alpha``, ``temperature``, ``reduction`` (``mean`` over the
            positions with a loss, ``sum``, or ``none`` for ``(B, T - 1)``), ``hard_loss_weight`` (adds the
            cross-entropy on the targets), ``scale_by_temperature_squared``, ``backend``; with ``fused``
            also ``chunk_size`` and the other options of :func:`fdistill.fused_linear_divergence_loss`.
    """
    model_kwargs = dict(model_kwargs or {})
    targets = _targets(input_ids, attention_mask, labels, ignore_index)
    if not fused:
        return _logits_loss(student, teacher, input_ids, attention_mask, targets, divergence, ignore_index,
                            model_kwargs, loss_options)  # fmt: skip

    s_head, t_head = lm_head_of(student), lm_head_of(teacher)
    s_hidden = final_hidden_states(student, input_ids, attention_mask, **model_kwargs)[:, :-1]
    with torch.no_grad():
        t_hidden = final_hidden_states(teacher, input_ids, attention_mask, **model_kwargs)[:, :-1]
    reduction = loss_options.pop("reduction", "mean")
    if reduction != "none":
        # Only the positions with a loss go through the heads (prompt and padding cost nothing).
        keep = targets != ignore_index
        s_hidden, t_hidden, targets = s_hidden[keep], t_hidden[keep], targets[keep]
    s_hidden, s_bias = _scaled(s_hidden, s_head)
    t_hidden, t_bias = _scaled(t_hidden, t_head)
    t_hidden = t_hidden.to(t_head.weight.device)
    return fused_linear_divergence_loss(
        s_hidden.to(s_head.weight.device), s_head.weight, student_bias=s_bias,
        teacher_hidden=t_hidden, teacher_weight=t_head.weight.detach(),
        teacher_bias=None if t_bias is None else t_bias.detach(), softcap=s_head.softcap,
        teacher_softcap=t_head.softcap, divergence=divergence, labels=targets.to(s_head.weight.device),
        ignore_index=ignore_index, reduction=reduction, **loss_options,
    )  # fmt: skip


def _scaled(hidden, head: LMHeadSpec):
    """``scale * (h W^T + b) = (scale h) W^T + scale b``: the logit multiplier folded into the inputs."""
    if head.scale == 1.0:
        return hidden, head.bias
    return hidden * head.scale, None if head.bias is None else head.bias * head.scale


def _logits_loss(student, teacher, input_ids, attention_mask, targets, divergence, ignore_index,
                 model_kwargs, options):  # fmt: skip
    model_kwargs.setdefault("use_cache", False)
    s_logits = student(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits[:, :-1]
    hard = options.pop("hard_loss_weight", 0.0)
    reduction = options.get("reduction", "mean")
    loss = divergence_loss(s_logits, t_logits.to(s_logits.device), divergence, labels=targets,
                           ignore_index=ignore_index, **options)  # fmt: skip
    if hard:
        s_float = s_logits.to(torch.promote_types(s_logits.dtype, torch.float32))
        ce = F.cross_entropy(s_float.flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                             reduction="none").view_as(targets)  # fmt: skip
        if reduction == "mean":
            ce = ce.sum() / (targets != ignore_index).sum().clamp_min(1)
        elif reduction == "sum":
            ce = ce.sum()
        loss = loss + hard * ce
    return loss
