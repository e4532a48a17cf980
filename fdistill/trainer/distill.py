"""Distillation of one LM into another on sequences (prompt + completion), with fdistill's losses.

The token-level loss is taken on the completion positions:
``(1/L) sum_n D(p_T(. | x, y_<n) || p_S(. | x, y_<n))`` per sequence (GKD's per-sequence loss), with
``D`` any :data:`fdistill.DIVERGENCES` entry (``divergence_loss``; ``fused=True`` runs
``fused_linear_divergence_loss`` from the student's hidden states and LM head instead) or, with
``divergence="fy"``, the alpha = 1.5 Fenchel–Young loss with the teacher's probabilities as target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fdistill

from .model import TinyLM

LOSSES = (*fdistill.DIVERGENCES, "fy")


@dataclass
class Task:
    """Prompts of ``prompt_len`` tokens drawn uniformly from ``vocab`` ids; completions of ``length``."""

    vocab: int
    prompt_len: int
    length: int

    def prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.vocab, (n, self.prompt_len), generator=generator)


class OfflineData:
    """A fixed dataset: ``prompts x generations`` completions sampled once from ``source``; batches
    are drawn by reshuffling it every epoch."""

    def __init__(
        self,
        source: TinyLM,
        task: Task,
        prompts: int,
        generations: int,
        generator: torch.Generator,
        temperature: float = 1.0,
    ):
        x = task.prompts(prompts, generator).repeat_interleave(generations, 0)
        self.sequences = source.sample(x, task.length, temperature=temperature, generator=generator)
        self.order, self.cursor = None, 0

    def batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        n = self.sequences.shape[0]
        picked = []
        while len(picked) < size:
            if self.order is None or self.cursor >= n:
                self.order, self.cursor = torch.randperm(n, generator=generator), 0
            take = self.order[self.cursor : self.cursor + size - len(picked)]
            self.cursor += take.numel()
            picked.append(take)
        return self.sequences[torch.cat(picked)]

    def state(self) -> dict:
        return {"cursor": self.cursor, "order": None if self.order is None else self.order.tolist()}

    def load_state(self, state: dict) -> None:
        self.cursor = state["cursor"]
        self.order = None if state["order"] is None else torch.tensor(state["order"])


class SamplePool:
    """Fresh completions from ``model``, sampled ``pool`` at a time (batched sampling is several times
    cheaper per sequence on a CPU) and each handed out once. For a fixed model this is exactly a fresh
    sample per batch; for a model in training the samples are up to ``pool / batch - 1`` updates old."""

    def __init__(self, model: TinyLM, task: Task, pool: int, temperature: float = 1.0):
        self.model, self.task, self.pool, self.temperature = model, task, pool, temperature
        self.left = torch.empty((0, task.prompt_len + task.length), dtype=torch.long)

    def take(self, size: int, generator: torch.Generator) -> torch.Tensor:
        while self.left.shape[0] < size:
            x = self.task.prompts(max(self.pool, size), generator)
            fresh = self.model.sample(x, self.task.length, temperature=self.temperature, generator=generator)
            self.left = torch.cat([self.left, fresh])
        out, self.left = self.left[:size], self.left[size:]
        return out

    def state(self) -> list:
        return self.left.tolist()

    def load_state(self, state: list) -> None:
        self.left = torch.tensor(state, dtype=torch.long).reshape(-1, self.task.prompt_len + self.task.length)


class OnlineData:
    """Fresh completions every step: from ``teacher`` (sequence-level KD), from the ``student``
    (on-policy), or a coin flip per batch with probability ``lmbda`` of on-policy (GKD's lambda).
    Teacher samples are drawn ``teacher_pool`` at a time (exactly fresh: the teacher is fixed), the
    student's ``student_pool`` at a time (default 4 batches: up to 3 updates old)."""

    def __init__(
        self,
        task: Task,
        teacher: TinyLM,
        student: TinyLM,
        lmbda: float,
        batch: int,
        temperature: float = 1.0,
        teacher_pool: int = 512,
        student_pool: int | None = None,
    ):
        if not 0 <= lmbda <= 1:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        self.lmbda = lmbda
        self.teacher = SamplePool(teacher, task, teacher_pool, temperature)
        self.student = SamplePool(student, task, student_pool or 4 * batch, temperature)

    def batch(self, size: int, generator: torch.Generator) -> torch.Tensor:
        on_policy = self.lmbda > 0 and float(torch.rand((), generator=generator)) < self.lmbda
        return (self.student if on_policy else self.teacher).take(size, generator)

    def state(self) -> dict:
        return {"teacher": self.teacher.state(), "student": self.student.state()}

    def load_state(self, state: dict) -> None:
        self.teacher.load_state(state["teacher"])
        self.student.load_state(state["student"])


def check_compatible(teacher: TinyLM, student: TinyLM, task: Task) -> None:
    if teacher.cfg.vocab != student.cfg.vocab:
        raise ValueError(
            f"teacher vocab ({teacher.cfg.vocab}) and student vocab ({student.cfg.vocab}) differ: the "
            "token-level divergence needs one vocabulary"
        )
    for who, model in (("teacher", teacher), ("student", student)):
        if task.prompt_len + task.length > model.cfg.context:
            raise ValueError(
                f"prompt + completion ({task.prompt_len + task.length}) exceeds the {who}'s context"
            )
        if model.cfg.vocab != task.vocab:
            raise ValueError(f"the {who}'s vocab ({model.cfg.vocab}) differs from the task's ({task.vocab})")


def distillation_loss(
    student: TinyLM,
    teacher: TinyLM,
    seqs: torch.Tensor,
    prompt_len: int,
    divergence: str = "forward_kl",
    fused: bool = False,
    **options,
) -> torch.Tensor:
    """Mean token-level loss of the student against the teacher on the completions of ``seqs``."""
    if divergence not in LOSSES:
        raise ValueError(f"divergence must be one of {list(LOSSES)}, got {divergence!r}")
    with torch.no_grad():
        teacher_logits = teacher.completion_logits(seqs, prompt_len)
    if divergence == "fy":
        logits = student.completion_logits(seqs, prompt_len)
        return fdistill.fy_loss(logits, teacher_logits.float().softmax(-1), "alpha", alpha=1.5)
    if fused:
        hidden = student.completion_hidden(seqs, prompt_len)
        return fdistill.fused_linear_divergence_loss(
            hidden, student.lm_head.weight, teacher_logits=teacher_logits, divergence=divergence, **options
        )
    return fdistill.divergence_loss(
        student.completion_logits(seqs, prompt_len), teacher_logits, divergence, **options
    )


def sft_loss(model: TinyLM, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Cross-entropy of the completion tokens (likelihood training on samples)."""
    return -model.sequence_logprobs(seqs, prompt_len).mean()


@torch.no_grad()
def sequence_kl(reference: TinyLM, model: TinyLM, seqs: torch.Tensor, prompt_len: int) -> float:
    """Per-token KL(reference || model) averaged over the completions of ``seqs``: the sequence-level
    KL per token, exactly (chain rule) in expectation when ``seqs`` are sampled from ``reference``."""
    ref = reference.completion_logits(seqs, prompt_len)
    out = model.completion_logits(seqs, prompt_len)
    return float(fdistill.divergence_loss(out, ref, "forward_kl"))
