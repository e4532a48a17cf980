"""Teacher-hacking detection inside a Hugging Face ``Trainer`` (TRL's trainers included).

:class:`TeacherHackingCallback` evaluates, every ``every`` optimiser steps, two token-level distances of the
student being trained on a fixed set of evaluation batches:

* **golden**: ``D(oracle, student)``, the distance to the ground-truth model (the oracle);
* **proxy**: ``D(teacher, student)``, the distance to the teacher the student is distilled from,

both :func:`fdistill.integrations.hf.causal_lm_distillation_loss` (``divergence`` and its options, the mean
over the positions with a loss), and feeds them to a :class:`fdistill.trainer.TeacherHackingMonitor`. The
monitor fits the early power law ``log golden = a + b log proxy`` and flags its departure and the hacking
step (golden rising while proxy still falls; Tiapkin et al., 2025). Each evaluation is appended to the
trainer's ``state.log_history`` as ``{"step", "teacher_hacking/golden", "teacher_hacking/proxy"}`` and the
events are logged (``logging.WARNING``); ``stop_on_hacking=True`` ends training at the hacking step.
"""

from __future__ import annotations

import inspect
import logging

from . import require

transformers = require("transformers", "fdistill.integrations.callbacks")

import torch  # noqa: E402

from ..trainer.monitor import TeacherHackingMonitor  # noqa: E402
from .hf import _targets, causal_lm_distillation_loss  # noqa: E402

__all__ = ["TeacherHackingCallback"]

logger = logging.getLogger(__name__)

_BATCH_KEYS = ("input_ids", "attention_mask", "labels")
_IGNORE_INDEX = inspect.signature(causal_lm_distillation_loss).parameters["ignore_index"].default


class TeacherHackingCallback(transformers.TrainerCallback):
    """Golden and proxy distances every ``every`` steps, checked by a :class:`TeacherHackingMonitor`.

    Args:
        oracle: the ground-truth causal LM (same vocabulary as the student).
        teacher: the teacher the student is distilled from.
        eval_batches: a list of dicts with ``input_ids`` and optionally ``attention_mask`` and ``labels``
            (``-100`` on the prompt), ``(B, T)`` tensors: a fixed evaluation set, the same at every
            evaluation so that the curve is comparable across steps.
        every: evaluate after every ``every``-th optimiser step (>= 1), and at step 0 before training.
        monitor: the :class:`TeacherHackingMonitor` to feed (a default one if None); read it after
            training (``callback.monitor.summary()``).
        divergence, loss_options: the distance, as for :func:`causal_lm_distillation_loss` (default forward
            KL: ``KL(reference || student)``).
        stop_on_hacking: set ``control.should_training_stop`` when the monitor flags hacking.
    """

    def __init__(self, oracle, teacher, eval_batches, *, every: int = 50, monitor=None,
                 divergence: str = "forward_kl", loss_options: dict | None = None,
                 stop_on_hacking: bool = False):  # fmt: skip
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if not isinstance(eval_batches, (list, tuple)) or not eval_batches:
            raise ValueError("eval_batches must be a non-empty list of dicts with 'input_ids'")
        for i, b in enumerate(eval_batches):
            if not isinstance(b, dict) or not isinstance(b.get("input_ids"), torch.Tensor):
                raise ValueError(f"eval_batches[{i}] must be a dict with an 'input_ids' tensor")
            unknown = set(b) - set(_BATCH_KEYS)
            if unknown:
                raise ValueError(
                    f"eval_batches[{i}] has unknown keys {sorted(unknown)}; expected some of {_BATCH_KEYS}"
                )
        if monitor is not None and not isinstance(monitor, TeacherHackingMonitor):
            raise TypeError(f"monitor must be a TeacherHackingMonitor, got {type(monitor).__name__}")
        self.oracle, self.teacher, self.eval_batches = oracle, teacher, list(eval_batches)
        self.every, self.divergence = every, divergence
        self.loss_options = dict(loss_options or {})
        if "reduction" in self.loss_options:
            raise ValueError("loss_options cannot set reduction: the distances are means over the tokens")
        self.monitor = TeacherHackingMonitor() if monitor is None else monitor
        self.stop_on_hacking = stop_on_hacking

    @torch.no_grad()
    def distances(self, student) -> tuple[float, float]:
        """(golden, proxy): the token-weighted means over ``eval_batches`` of ``D(oracle, student)`` and
        ``D(teacher, student)``."""
        was_training = student.training
        student.eval()
        sums, tokens = [0.0, 0.0], 0
        device = next(student.parameters()).device
        try:
            for b in self.eval_batches:
                args = [b.get(k) for k in _BATCH_KEYS]
                args = [None if x is None else x.to(device) for x in args]
                ignore = self.loss_options.get("ignore_index", _IGNORE_INDEX)
                n = int((_targets(*args, ignore) != ignore).sum())
                for i, reference in enumerate((self.oracle, self.teacher)):
                    loss = causal_lm_distillation_loss(student, reference, *args, divergence=self.divergence,
                                                       reduction="sum", **self.loss_options)  # fmt: skip
                    sums[i] += float(loss)
                tokens += n
        finally:
            student.train(was_training)
        if tokens == 0:
            raise ValueError("eval_batches have no position with a loss (every label is -100 or padding)")
        return sums[0] / tokens, sums[1] / tokens

    def _evaluate(self, state, control, model):
        golden, proxy = self.distances(model)
        events = self.monitor.update(state.global_step, proxy=proxy, golden=golden)
        state.log_history.append(
            {"step": state.global_step, "teacher_hacking/golden": golden, "teacher_hacking/proxy": proxy}
        )
        for event in events:
            logger.warning("teacher hacking monitor, step %d: %s", state.global_step, event)
        if self.stop_on_hacking and self.monitor.hacking_step is not None:
            control.should_training_stop = True
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not self.monitor.steps:
            return self._evaluate(state, control, model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            return self._evaluate(state, control, model)
        return control
