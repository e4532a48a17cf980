"""fdistill.integrations: the Hugging Face causal-LM loss, the TRL GKD trainer, the example script.

Tiny randomly initialised models built from configs and an in-memory WordLevel tokenizer: no downloads.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from fdistill.integrations import causal_lm_distillation_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = 96
PAD, EOS = 0, 1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors


def _common(**kw):
    return dict(vocab_size=V, num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                eos_token_id=EOS, bos_token_id=2, **kw)  # fmt: skip


def make_model(arch: str, hidden: int = 32, layers: int = 1, tie: bool = False, **extra):
    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, tie_word_embeddings=tie,
                                          **_common(**extra))  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    if arch == "qwen2":
        config = transformers.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, tie_word_embeddings=tie,
                                          **_common(**extra))  # fmt: skip
        return transformers.Qwen2ForCausalLM(config)
    if arch == "gemma2":  # final_logit_softcapping, tied embeddings
        config = transformers.Gemma2Config(hidden_size=hidden, intermediate_size=2 * hidden, head_dim=8,
                                           num_hidden_layers=layers, final_logit_softcapping=0.5,
                                           **_common(**extra))  # fmt: skip
        return transformers.Gemma2ForCausalLM(config)
    if arch == "cohere":  # logit_scale
        config = transformers.CohereConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                           num_hidden_layers=layers, logit_scale=3.0,
                                           **_common(**extra))  # fmt: skip
        return transformers.CohereForCausalLM(config)
    raise ValueError(arch)


def batch(b: int = 3, t: int = 11, prompt: int = 3):
    """Right padding of different lengths, a prompt without loss, and one row with no loss at all."""
    input_ids = torch.randint(3, V, (b, t))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, t - 4 :] = 0
    attention_mask[2, prompt + 1 :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt] = -100
    return input_ids, attention_mask, labels


def loss_and_grads(student, teacher, inputs, **kw):
    student.zero_grad(set_to_none=True)
    loss = causal_lm_distillation_loss(student, teacher, *inputs, **kw)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_close_grads(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, n=name: f"{n}: {m}", **tol)


@pytest.mark.parametrize(
    "student_arch,teacher_arch,tie,options",
    [
        ("llama", "llama", False, dict(divergence="forward_kl")),
        ("qwen2", "llama", True, dict(divergence="jsd", beta=0.3, temperature=2.0)),
        ("llama", "qwen2", True, dict(divergence="reverse_kl", hard_loss_weight=0.5, reduction="sum")),
        ("gemma2", "gemma2", True, dict(divergence="forward_kl", temperature=0.7)),
        ("cohere", "llama", True, dict(divergence="tv", reduction="none")),
    ],
)
def test_fused_matches_logits(student_arch, teacher_arch, tie, options):
    """Hidden states + lm_head (fused) == the models' logits + divergence_loss: value and every student
    parameter's gradient (tied embeddings included), with padding and prompt positions ignored."""
    student = make_model(student_arch, hidden=32, layers=1, tie=tie).double()
    teacher = make_model(teacher_arch, hidden=48, layers=2).double().eval()
    inputs = batch()
    fused, g_fused = loss_and_grads(student, teacher, inputs, fused=True, **options)
    ref, g_ref = loss_and_grads(student, teacher, inputs, fused=False, **options)
    torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-12)
    assert_close_grads(g_fused, g_ref, rtol=1e-7, atol=1e-12)
    if options.get("reduction") == "none":
        assert fused.shape == (3, 10)
        assert (fused[inputs[2][:, 1:] == -100] == 0).all()
    if tie:
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


def test_lm_head_bias_and_default_labels():
    """A biased lm_head; without labels every non-padding next token counts."""
    student, teacher = make_model("llama").double(), make_model("llama", hidden=40).double()
    for model in (student, teacher):
        model.lm_head = torch.nn.Linear(model.config.hidden_size, V, bias=True, dtype=torch.float64)
        torch.nn.init.normal_(model.lm_head.bias)
    input_ids, attention_mask, _ = batch()
    fused, g_fused = loss_and_grads(student, teacher, (input_ids, attention_mask), divergence="jsd")
    ref, g_ref = loss_and_grads(student, teacher, (input_ids, attention_mask), divergence="jsd", fused=False)
    torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-12)
    assert_close_grads(g_fused, g_ref, rtol=1e-7, atol=1e-12)
    assert "lm_head.bias" in g_fused


def test_importing_fdistill_does_not_import_transformers():
    code = (
        "import sys, fdistill, fdistill.integrations as i; "
        "assert not {'transformers', 'trl'} & set(sys.modules), sorted(sys.modules); "
        "assert 'FdistillGKDTrainer' in dir(i)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_trl_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "fdistill.integrations.trl", raising=False)
    monkeypatch.setitem(sys.modules, "trl.experimental.gkd", None)
    with pytest.raises(ImportError, match=r"fdistill\[integrations\]"):
        from fdistill.integrations import FdistillGKDTrainer  # noqa: F401
    monkeypatch.delitem(sys.modules, "fdistill.integrations.trl", raising=False)


# ---------------------------------------------------------------------------------------------- TRL


def word_tokenizer():
    """A PreTrainedTokenizerFast over the words t0..t{V-1}, built in memory, with a minimal chat template."""
    vocab = {"<pad>": PAD, "</s>": EOS, "<s>": 2, **{f"t{i}": i for i in range(3, V)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% if m['role'] == 'assistant' %}</s> {% endif %}"
        "{% endfor %}"
    )
    return fast


def gkd_trainers(tmp_path, beta, **config):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fdistill.integrations.trl import FdistillGKDTrainer

    torch.manual_seed(0)
    student, teacher = make_model("llama", hidden=32), make_model("qwen2", hidden=48, layers=2, tie=True)
    chats = [("t3 t4 t5", "t6 t7"), ("t8", "t9 t10 t11 t12 t13 t14")]  # different lengths: padding
    rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in chats]
    dataset = datasets.Dataset.from_dict({"messages": rows * 2})
    options = dict(output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True, bf16=False,
                   max_length=32, max_new_tokens=4, per_device_train_batch_size=2, logging_steps=1,
                   save_strategy="no", **config)  # fmt: skip
    make = lambda cls: cls(model=student, teacher_model=teacher, args=GKDConfig(**options),  # noqa: E731
                           train_dataset=dataset, processing_class=word_tokenizer())  # fmt: skip
    return make(FdistillGKDTrainer), make(GKDTrainer)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_compute_loss_matches_trl(tmp_path, beta):
    """FdistillGKDTrainer.compute_loss == TRL's GKDTrainer.compute_loss on the collator's batch (prompt and
    padding masked), with and without num_items_in_batch; same gradient for every student parameter."""
    ours, theirs = gkd_trainers(tmp_path, beta, lmbda=0.0)
    inputs = ours.data_collator([ours.train_dataset[i] for i in range(2)])
    assert (inputs["labels"] == -100).any() and (inputs["attention_mask"] == 0).any()
    for num_items in (None, torch.tensor(5)):
        grads = []
        for trainer in (ours, theirs):
            trainer.model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items)
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=2e-5, atol=1e-7)
        assert_close_grads(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-6)
    _, outputs = ours.compute_loss(ours.model, dict(inputs), return_outputs=True)
    assert outputs.logits is None and outputs.loss is not None


def test_gkd_loss_temperature(tmp_path):
    """``loss_temperature`` divides the logits as ``generalized_jsd_loss(..., temperature=)`` does."""
    ours, theirs = gkd_trainers(tmp_path, 0.5, lmbda=0.0)
    ours.loss_temperature = 2.0
    inputs = ours.data_collator([ours.train_dataset[i] for i in range(2)])
    loss = ours.compute_loss(ours.model, dict(inputs))
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        student, teacher = ours.model(**model_inputs).logits, ours.teacher_model(**model_inputs).logits
    expected = theirs.generalized_jsd_loss(
        student[:, :-1], teacher[:, :-1], labels=inputs["labels"][:, 1:], beta=0.5, temperature=2.0
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=2e-5, atol=1e-7)


def test_gkd_trains_on_and_off_policy(tmp_path):
    """A short run through TRL's own training loop: on-policy generation (lmbda) included."""
    ours, _ = gkd_trainers(tmp_path, 0.5, lmbda=0.5, max_steps=4, learning_rate=1e-2)
    generated = []
    generate = ours.generate_on_policy_outputs

    def spy(*args):
        generated.append(True)
        return generate(*args)

    ours.generate_on_policy_outputs = spy
    result = ours.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert result.global_step == 4
    assert 0 < len(generated) < 4  # both student-generated and dataset batches (TRL seeds `random`)


def distillation_trainers(tmp_path, beta, **config):
    """fdistill's and TRL's DistillationTrainer on the same tiny models (on-policy: the student generates)."""
    from trl import DistillationConfig, DistillationTrainer

    from fdistill.integrations.trl import FdistillDistillationTrainer

    torch.manual_seed(0)
    student, teacher = make_model("llama", hidden=32), make_model("qwen2", hidden=48, layers=2, tie=True)
    prompts = [[{"role": "user", "content": p}] for p in ("t3 t4 t5", "t8", "t9 t10", "t11 t12 t13 t14")]
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    options = dict(output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True, bf16=False,
                   max_completion_length=5, per_device_train_batch_size=2, logging_steps=1,
                   save_strategy="no", **config)  # fmt: skip
    make = lambda cls: cls(model=student, teacher_model=teacher, args=DistillationConfig(**options),  # noqa: E731
                           train_dataset=dataset, processing_class=word_tokenizer())  # fmt: skip
    return make(FdistillDistillationTrainer), make(DistillationTrainer)


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 0.7), (1.0, 1.0)])
def test_distillation_loss_matches_trl(tmp_path, beta, temperature):
    """FdistillDistillationTrainer._compute_loss == TRL's on the same generated completions: loss (with and
    without num_items_in_batch), the entropy sum and token count it logs, every student gradient."""
    ours, theirs = distillation_trainers(tmp_path, beta, temperature=temperature)
    inputs = ours._generate_and_score_completions([ours.train_dataset[i] for i in range(2)])
    mask = inputs["completion_mask"]
    assert mask.sum() > 0 and (inputs["prompt_mask"] == 0).any()  # left-padded prompts of different lengths
    for num_items in (None, torch.tensor(7.0)):
        got = []
        for trainer in (ours, theirs):
            trainer.model.zero_grad(set_to_none=True)
            loss, entropy, n_valid = trainer._compute_loss(trainer.model, dict(inputs), num_items)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
            got.append((loss.detach(), entropy, n_valid, grads))
        (l0, e0, n0, g0), (l1, e1, n1, g1) = got
        torch.testing.assert_close(l0, l1, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(e0, e1.float(), rtol=2e-5, atol=1e-5)
        assert int(n0) == int(n1) == int(mask.sum())
        assert_close_grads(g0, g1, rtol=1e-3, atol=1e-6)


def test_distillation_trains_on_policy(tmp_path):
    """A short run through TRL's own loop: the student generates every batch, the loss falls finite, TRL's
    entropy metric is logged; ``log_entropy=False`` logs 0."""
    ours, _ = distillation_trainers(tmp_path, 0.5, max_steps=3, learning_rate=1e-2)
    generated = []
    generate = ours._generate_and_score_completions

    def spy(batch):
        generated.append(len(batch))
        return generate(batch)

    ours._generate_and_score_completions = spy
    result = ours.train()
    assert result.global_step == 3 and len(generated) == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    entropies = [log["entropy"] for log in ours.state.log_history if "entropy" in log]
    assert len(entropies) == 3 and all(e > 0 for e in entropies)

    quiet, _ = distillation_trainers(tmp_path / "quiet", 0.5, max_steps=1)
    quiet.log_entropy = False
    quiet.train()
    assert [log["entropy"] for log in quiet.state.log_history if "entropy" in log] == [0.0]


def test_teacher_hacking_callback(tmp_path):
    """Golden / proxy every step (and at step 0) in log_history, equal to the loss computed directly; the
    monitor gets every point; stop_on_hacking ends the run at the flagged step; bad arguments are named."""
    from fdistill.integrations import TeacherHackingCallback
    from fdistill.trainer import TeacherHackingMonitor

    ours, _ = gkd_trainers(tmp_path, 0.5, lmbda=0.0, max_steps=3, learning_rate=1e-2)
    oracle = make_model("llama", hidden=24)
    eval_batch = dict(zip(("input_ids", "attention_mask", "labels"), batch(), strict=True))
    callback = TeacherHackingCallback(oracle, ours.teacher_model, [eval_batch], every=1)
    ours.add_callback(callback)
    ours.train()
    points = [log for log in ours.state.log_history if "teacher_hacking/golden" in log]
    assert [p["step"] for p in points] == [0, 1, 2, 3] == callback.monitor.steps
    student = ours.model.eval()
    for key, reference in (("golden", oracle), ("proxy", ours.teacher_model)):
        want = causal_lm_distillation_loss(student, reference, *batch_values(eval_batch)).item()
        assert points[-1][f"teacher_hacking/{key}"] == pytest.approx(want, rel=1e-5)
    assert points[0]["teacher_hacking/proxy"] != points[-1]["teacher_hacking/proxy"]

    class FlagsAtStep1(TeacherHackingMonitor):
        def update(self, step, *, proxy, golden):
            events = super().update(step, proxy=proxy, golden=golden)
            if step >= 1:
                self.hacking_step = step
            return events

    stopping, _ = gkd_trainers(tmp_path / "stop", 0.5, lmbda=0.0, max_steps=5)
    stopping.add_callback(TeacherHackingCallback(oracle, stopping.teacher_model, [eval_batch], every=1,
                                                 monitor=FlagsAtStep1(), stop_on_hacking=True))  # fmt: skip
    assert stopping.train().global_step == 1

    with pytest.raises(ValueError, match="every"):
        TeacherHackingCallback(oracle, oracle, [eval_batch], every=0)
    with pytest.raises(ValueError, match="eval_batches"):
        TeacherHackingCallback(oracle, oracle, [])
    with pytest.raises(ValueError, match=r"eval_batches\[0\] has unknown keys"):
        TeacherHackingCallback(oracle, oracle, [dict(eval_batch, pixel_values=None)])
    with pytest.raises(TypeError, match="monitor"):
        TeacherHackingCallback(oracle, oracle, [eval_batch], monitor={})
    empty = dict(eval_batch, labels=torch.full_like(eval_batch["labels"], -100))
    with pytest.raises(ValueError, match="no position with a loss"):
        TeacherHackingCallback(oracle, oracle, [empty]).distances(student)


def batch_values(b):
    return b["input_ids"], b["attention_mask"], b["labels"]


def test_example_script_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "examples" / "distill_hf.py"), "--steps", "12"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True, timeout=300)
    losses = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], out.stdout


def test_topk_files_example_runs(tmp_path):
    """examples/distill_topk_files.py: the teacher's top-k stored, the student trained from the files alone
    (both tails); the loss falls."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for tail in ("renormalize", "bucket"):
        cmd = [sys.executable, str(ROOT / "examples" / "distill_topk_files.py"), "--steps", "40",
               "--topk-tail", tail, "--out", str(tmp_path / tail)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True, timeout=300)
        losses = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step")]
        assert len(losses) == 40 and losses[-1] < 0.6 * losses[0], out.stdout
        assert (tmp_path / tail / "manifest.json").is_file() and list((tmp_path / tail).glob("shard-*"))


def test_trl_onpolicy_example_runs():
    """examples/distill_trl_onpolicy.py: on-policy distillation through FdistillDistillationTrainer."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "examples" / "distill_trl_onpolicy.py"), "--steps", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True, timeout=300)
    losses = [float(line.split()[3]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses), out.stdout
