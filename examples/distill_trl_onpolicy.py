"""On-policy distillation through TRL's ``DistillationTrainer``, with the loss computed by fdistill.

Runs on the CPU in seconds, offline: a random Llama teacher and a smaller random Llama student share an
in-memory word-level tokenizer (``t0`` ... ``t{V-1}``); at every step the student generates completions of
the prompts (TRL's generation), and :class:`fdistill.integrations.FdistillDistillationTrainer` computes
TRL's generalized JSD (``--beta``; 0 = forward KL, 1 = reverse KL) from both models' final hidden states and
LM heads with :func:`fdistill.fused_linear_divergence_loss`, so the logits are never materialised.

    python examples/distill_trl_onpolicy.py --steps 8 --beta 0.5

With real models, pass checkpoints (``model="Qwen/Qwen2.5-0.5B-Instruct"``,
``teacher_model="Qwen/Qwen2.5-1.5B-Instruct"``), their tokenizer and a prompt dataset; everything else
(vLLM generation, DDP/FSDP, logging, checkpoints) is TRL's.

Requires ``pip install 'fdistill[integrations]'`` (transformers, TRL >= 1.16) and ``datasets``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from fdistill.integrations import require

transformers = require("transformers", "examples/distill_trl_onpolicy.py")
trl = require("trl", "examples/distill_trl_onpolicy.py")
datasets = require("datasets", "examples/distill_trl_onpolicy.py")
tokenizers = require("tokenizers", "examples/distill_trl_onpolicy.py")
from fdistill.integrations.trl import FdistillDistillationTrainer  # noqa: E402

VOCAB = 64
PAD, EOS, BOS = 0, 1, 2


def word_tokenizer():
    """A fast tokenizer over the words t3..t{V-1} (plus <pad>, </s>, <s>), with a minimal chat template."""
    vocab = {"<pad>": PAD, "</s>": EOS, "<s>": BOS, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def tiny_llama(hidden: int, layers: int):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--completion-length", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    teacher, student = tiny_llama(64, 2).eval(), tiny_llama(32, 1)
    g = torch.Generator().manual_seed(args.seed)
    words = lambda n: " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=g))  # noqa: E731
    lengths = torch.randint(2, 7, (16,), generator=g).tolist()
    prompts = [[{"role": "user", "content": words(n)}] for n in lengths]
    with tempfile.TemporaryDirectory() as out:
        config = trl.DistillationConfig(
            output_dir=out, beta=args.beta, max_completion_length=args.completion_length,
            learning_rate=args.lr, max_steps=args.steps, per_device_train_batch_size=4, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=args.seed, disable_tqdm=True,
        )  # fmt: skip
        trainer = FdistillDistillationTrainer(
            model=student, teacher_model=teacher, args=config, processing_class=word_tokenizer(),
            train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        )  # fmt: skip
        trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    for log in logs:
        print(f"step {log['step']:3d}  jsd {log['loss']:.5f}  entropy {log['entropy']:.3f}")
    return [log["loss"] for log in logs]


if __name__ == "__main__":
    main()
