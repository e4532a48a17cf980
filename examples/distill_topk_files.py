"""Offline distillation from stored top-k files: the teacher runs once, the student trains from the files.

Runs on the CPU in seconds: a random Llama teacher (2 layers, hidden 64) writes its top-k next-token
log-probabilities for a set of token sequences to sharded safetensors files (:func:`fdistill.topk.write_topk`:
checksummed, resumable), then a smaller Qwen2 student (1 layer, hidden 32) is trained from those files alone
with the fused LM-head loss (:func:`fdistill.fused_linear_divergence_loss` with ``teacher_topk=``):
neither the teacher's nor the student's ``(tokens x V)`` logits are ever materialised.

    python examples/distill_topk_files.py --steps 40 --k 32 --topk-tail bucket --out /tmp/teacher-topk

Position ``t`` of a stored sequence is the teacher's distribution of token ``t + 1``: the student's hidden
state at position ``t`` is matched to it, and the positions without a loss (prompt, padding, the last one)
get the label -100. With real models, ``teacher`` returns ``model(input_ids[None]).logits[0]`` or the
``(ids, logprobs)`` a vLLM pipeline produced (:mod:`fdistill.topk.vllm` reads axolotl's layout).

Requires ``pip install 'fdistill[integrations,trainer]'`` (transformers; safetensors and tqdm).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fdistill import fused_linear_divergence_loss, topk
from fdistill.integrations import require
from fdistill.integrations.hf import final_hidden_states

transformers = require("transformers", "examples/distill_topk_files.py")

VOCAB = 1000
PAD = 0
IGNORE = -100
TEACHER_SHARPNESS = 8.0


def tiny_models(seed: int = 0):
    """A Llama teacher (2 layers, hidden 64) and a Qwen2 student (1 layer, hidden 32), random weights."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    teacher = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **common)
    )
    with torch.no_grad():  # a peaked teacher (a random init is near uniform): its top-k holds its mass
        teacher.lm_head.weight.mul_(TEACHER_SHARPNESS)
    student = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, **common)
    )
    return teacher.eval(), student


def sequences(generator, count: int, min_len: int = 12, max_len: int = 32) -> list[torch.Tensor]:
    """Random token sequences of different lengths (the dataset: one 1-D tensor of ids per example)."""
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=generator)
    return [torch.randint(1, VOCAB, (int(n),), generator=generator) for n in lengths]


def collate(examples: list[torch.Tensor], prompt: int):
    """Right-padded ``input_ids``, ``attention_mask`` and next-token ``labels`` (-100 on the first ``prompt``
    positions, the padding and each sequence's last position, which has no next token)."""
    length = max(len(x) for x in examples)
    input_ids = torch.full((len(examples), length), PAD)
    labels = torch.full((len(examples), length), IGNORE)
    for i, x in enumerate(examples):
        input_ids[i, : len(x)] = x
        labels[i, prompt : len(x) - 1] = x[prompt + 1 :]
    return input_ids, (input_ids != PAD).long(), labels


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--k", type=int, default=32, help="top-k width stored per position")
    parser.add_argument("--topk-tail", default="renormalize", choices=["renormalize", "bucket"])
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=4, help="leading positions without a loss")
    parser.add_argument("--out", default=None, help="directory of the top-k files (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    teacher, student = tiny_models(args.seed)
    data = sequences(torch.Generator().manual_seed(args.seed), args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        start = time.perf_counter()
        with torch.no_grad():  # 1. the teacher, once: logits [T, V] -> top-k of log_softmax, stored
            manifest = topk.write_topk(out, data, lambda ids: teacher(ids[None]).logits[0], k=args.k,
                                       vocab_size=VOCAB, shard_tokens=256, progress=False,
                                       meta={"teacher": "random llama"})  # fmt: skip
        shards = len(manifest["shards"])
        print(f"stored top-{args.k} of {manifest['num_tokens']} positions in {shards} shards "
              f"({time.perf_counter() - start:.1f}s) under {out}")  # fmt: skip
        # 2. from here on the teacher is not used: the student trains from the files alone
        stored = topk.TopKDataset(out)
        optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
        head = student.get_output_embeddings().weight
        losses = []
        start = time.perf_counter()
        for step in range(args.steps):
            first = (step * args.batch) % len(data)
            ids = [(first + j) % len(data) for j in range(args.batch)]
            input_ids, attention_mask, labels = collate([data[i] for i in ids], args.prompt)
            teacher_batch = stored.batch(ids, pad_to=input_ids.shape[1])  # [B, T, k], padding a placeholder
            hidden = final_hidden_states(student, input_ids, attention_mask)
            loss = fused_linear_divergence_loss(
                hidden, head, teacher_topk=teacher_batch.teacher_topk, topk_tail=args.topk_tail,
                divergence=args.divergence, labels=labels, ignore_index=IGNORE,
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
