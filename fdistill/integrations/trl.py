"""TRL's ``GKDTrainer`` with the generalized JSD computed by fdistill's fused LM-head loss.

:class:`FdistillGKDTrainer` only overrides ``compute_loss``: TRL's on-policy sampling (``lmbda``),
sequence-level KD (``seq_kd``), data collation and everything else are TRL's own. The loss is the one
TRL's ``compute_loss`` computes (checked against TRL 1.16):

* ``GKDTrainer.generalized_jsd_loss`` with ``beta=args.beta``: ``beta KL(p || m) + (1 - beta) KL(q || m)``,
  ``m = beta p + (1 - beta) q`` (``p`` teacher, ``q`` student), ``beta = 0`` forward KL, ``beta = 1``
  reverse KL -- the convention of fdistill's ``divergence="jsd"``;
* at temperature 1 (``args.temperature`` is TRL's *sampling* temperature; set ``loss_temperature`` on the
  trainer to divide the logits too);
* on the next-token shifted ``labels != -100`` positions (prompt and padding excluded by the collator);
* reduced as ``sum / num_items_in_batch`` when the Trainer passes ``num_items_in_batch`` (gradient
  accumulation), otherwise the mean over those positions.

What changes is how: the student's and the teacher's final hidden states go through their ``lm_head`` weights
chunk by chunk (:func:`fdistill.integrations.hf.causal_lm_distillation_loss`), only at the positions with a
loss, so neither model's ``(B, T, V)`` logits are materialised. ``compute_loss(..., return_outputs=True)``
therefore returns a model output holding the loss only (no logits).

TRL's ``DistillationTrainer`` (``trl.DistillationTrainer``, stable since TRL 1.16: on-policy, the student
generates the completions) is covered by :class:`FdistillDistillationTrainer`. It overrides the trainer's
``_compute_loss(unwrapped_student, inputs, num_items_in_batch)`` (a private method of TRL's, checked against
TRL 1.16 by the tests): the same hidden states (TRL's ``_get_last_hidden_state``, completion positions
only), the same loss (generalized JSD with ``args.beta`` at ``args.temperature``, on ``completion_mask``
times ``tool_mask``; ``sum / num_items_in_batch`` or the mean over those positions), computed by
:func:`fdistill.fused_linear_divergence_loss`; the logged student entropy as TRL logs it.
"""

from __future__ import annotations

from . import require

require("transformers", "fdistill.integrations.trl")
_gkd = require("trl.experimental.gkd", "fdistill.integrations.trl")
_trl = require("trl", "fdistill.integrations.trl")

import torch  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from ..fused_linear import fused_linear_divergence_loss  # noqa: E402
from .hf import _scaled, causal_lm_distillation_loss, lm_head_of  # noqa: E402

__all__ = ["FdistillDistillationTrainer", "FdistillGKDTrainer"]

try:  # TRL's helper to run a method of a DDP/FSDP-wrapped model through the wrapper's forward
    from trl.models.utils import _ForwardRedirection
except ImportError:  # pragma: no cover - other TRL versions
    _ForwardRedirection = None


class FdistillGKDTrainer(_gkd.GKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` whose loss is computed by fdistill (same value, no logits).

    Constructed exactly like ``GKDTrainer``. Class attributes, overridable per instance:

    * ``loss_temperature`` (``None``): temperature of the divergence; ``None`` keeps TRL's 1.0.
    * ``loss_options`` (``None``): a dict of extra options of :func:`fdistill.fused_linear_divergence_loss`
      (``chunk_size``, ``backend``, ``hard_loss_weight``, ...).
    """

    loss_temperature: float | None = None
    loss_options: dict | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        args = (student, teacher, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        kwargs = dict(
            divergence="jsd",
            beta=self.beta,
            temperature=1.0 if self.loss_temperature is None else self.loss_temperature,
            reduction="mean" if num_items_in_batch is None else "sum",
            **(self.loss_options or {}),
        )
        if model is not student and _ForwardRedirection is not None:
            # Through the DDP/FSDP wrapper's forward, so that it prepares its gradient hooks / gathers shards.
            loss = _ForwardRedirection()(model, student, causal_lm_distillation_loss, *args, **kwargs)
        else:
            loss = causal_lm_distillation_loss(*args, **kwargs)
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss


class FdistillDistillationTrainer(_trl.DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is computed by fdistill (same value and gradient, no logits).

    Constructed exactly like ``DistillationTrainer``; on-policy generation, tool calls, vLLM, logging and
    checkpoints are TRL's. Class attributes, overridable per instance:

    * ``loss_options`` (``None``): a dict of extra options of :func:`fdistill.fused_linear_divergence_loss`
      (``chunk_size``, ``backend``, ...). ``divergence``, ``beta`` and ``temperature`` come from the config.
    * ``log_entropy`` (``True``): compute the student's per-token entropy for TRL's ``entropy`` metric (one
      extra gradient-free pass through the student's head, chunked); ``False`` logs 0 and saves that pass.
    """

    loss_options: dict | None = None
    log_entropy: bool = True
    entropy_chunk_rows: int = 1024

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep_last = inputs["completion_ids"].size(1)
        extra = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        s_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, keep_last, **extra
        )
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            t_hidden = self._forward_redirection(
                self.teacher_model, teacher, self._get_last_hidden_state, teacher, input_ids, attention_mask,
                keep_last, **extra,
            )  # fmt: skip
        s_head, t_head = lm_head_of(unwrapped_student), lm_head_of(teacher)
        if s_head.weight.device != t_head.weight.device:
            raise ValueError(
                f"the student's lm_head is on {s_head.weight.device}, the teacher's on "
                f"{t_head.weight.device}: place both on the same device (device_map)"
            )
        device = s_head.weight.device
        valid = loss_mask.to(device).reshape(-1) != 0
        n_valid = valid.sum()
        s_hidden, s_bias = _scaled(s_hidden.to(device).reshape(-1, s_hidden.size(-1))[valid], s_head)
        t_hidden, t_bias = _scaled(t_hidden.to(device).reshape(-1, t_hidden.size(-1))[valid], t_head)
        loss = fused_linear_divergence_loss(
            s_hidden, s_head.weight, student_bias=s_bias, teacher_hidden=t_hidden,
            teacher_weight=t_head.weight.detach(), teacher_bias=None if t_bias is None else t_bias.detach(),
            softcap=s_head.softcap, teacher_softcap=t_head.softcap, divergence="jsd", beta=self.beta,
            temperature=self.temperature, reduction="sum", **(self.loss_options or {}),
        )  # fmt: skip
        if num_items_in_batch is None:
            loss = loss / n_valid.clamp(min=1)  # a rank with no completion token: a finite 0
        else:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        entropy_sum = loss.new_zeros(())
        if self.log_entropy:
            entropy_sum = _entropy_sum(
                s_hidden.detach(), s_head, s_bias, self.temperature, self.entropy_chunk_rows
            )
        return loss, entropy_sum, n_valid


# The multimodal fields TRL's DistillationTrainer forwards to both models (TRL 1.16).
_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
    "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


@torch.no_grad()
def _entropy_sum(hidden, head, bias, temperature, chunk_rows):
    """Sum over rows of the entropy (nats) of ``softmax(softcap(h W^T + b) / temperature)``, in float32,
    ``chunk_rows`` rows at a time: ``H = -sum q log q``."""
    total = hidden.new_zeros((), dtype=torch.float32)
    weight = head.weight.detach()
    for rows in hidden.split(chunk_rows):
        z = rows @ weight.T
        if bias is not None:
            z = z + bias.detach()
        z = z.float()
        if head.softcap is not None:
            z = head.softcap * torch.tanh(z / head.softcap)
        z = z / temperature
        total += torch.special.entr(z.softmax(-1)).sum()  # -q log q, 0 at q = 0
    return total
