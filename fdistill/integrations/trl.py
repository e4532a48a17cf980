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

TRL's ``DistillationTrainer`` (``trl.DistillationTrainer``, on-policy, ``beta`` in the same convention)
already computes its loss from the hidden states with its own chunked kernel in ``_compute_loss``;
fdistill's loss fits there the same way (``causal_lm_distillation_loss(..., divergence="jsd",
beta=self.beta, temperature=self.temperature)`` on ``prompt_ids + completion_ids`` with labels
``-100`` outside ``completion_mask``), but that method is private, so no subclass is provided for it.
"""

from __future__ import annotations

from . import require

require("transformers", "fdistill.integrations.trl")
_gkd = require("trl.experimental.gkd", "fdistill.integrations.trl")

import torch  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

from .hf import causal_lm_distillation_loss  # noqa: E402

__all__ = ["FdistillGKDTrainer"]

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
