"""Distil one Hugging Face causal LM into another with fdistill's fused LM-head loss.

Runs offline on the CPU in seconds: a randomly initialised Llama teacher (2 layers, hidden 64) and a smaller
Qwen2 student (1 layer, hidden 32) sharing a 1000-token vocabulary, trained on random token sequences with
padding and a prompt that is excluded from the loss. The loss is computed from the models' final hidden
states and ``lm_head`` weights (:func:`fdistill.integrations.hf.causal_lm_distillation_loss`), so the
``(tokens x V)`` logits are never materialised.

    python examples/distill_hf.py --steps 30 --divergence jsd --beta 0.5

With real models (same tokenizer / vocabulary), replace the configs by pretrained checkpoints and the random
batches by tokenized text (``labels`` = ``input_ids`` with -100 on the prompt and the padding)::

    teacher = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-1.5B-Instruct", dtype=torch.bfloat16).eval()
    student = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", dtype=torch.bfloat16)
    loss = causal_lm_distillation_loss(student, teacher, batch["input_ids"], batch["attention_mask"],
                                       batch["labels"], divergence="forward_kl", temperature=1.0)

Requires ``pip install 'fdistill[integrations]'``.
"""

from __future__ import annotations

import argparse
import time

import torch

from fdistill.integrations import require

transformers = require("transformers", "examples/distill_hf.py")
from fdistill.integrations.hf import causal_lm_distillation_loss  # noqa: E402

VOCAB = 1000
PAD = 0


def tiny_models(seed: int = 0):
    """A Llama teacher (2 layers, hidden 64) and a Qwen2 student (1 layer, hidden 32), random weights."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    teacher = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **common)
    )
    student = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, tie_word_embeddings=True, **common
        )
    )
    return teacher.eval(), student


def random_batch(generator, batch: int = 8, length: int = 32, prompt: int = 8):
    """Random tokens; each row is right-padded to ``length`` and its first ``prompt`` tokens get no loss."""
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt] = -100
    return input_ids, attention_mask, labels


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--beta", type=float, default=0.5, help="for jsd / jeffreys")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--unfused", action="store_true", help="use the models' logits (reference path)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    teacher, student = tiny_models(args.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    # A fixed pool of batches, cycled, so that the loss curve is not dominated by batch noise.
    batches = [random_batch(generator) for _ in range(4)]
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        input_ids, attention_mask, labels = batches[step % len(batches)]
        loss = causal_lm_distillation_loss(
            student, teacher, input_ids, attention_mask, labels, divergence=args.divergence,
            beta=args.beta, temperature=args.temperature, fused=not args.unfused,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}  {args.divergence} {loss.item():.5f}")
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f} in {time.perf_counter() - start:.1f}s")
    return losses


if __name__ == "__main__":
    main()
