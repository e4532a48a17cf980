"""The extras install cleanly alone: with only ``pip install fdistill`` (torch, numpy, triton), the losses,
the compat layer, ``fdistill.topk``'s pure functions and the trainer's modules import and run; whatever
needs an extra fails with an ImportError that names the pip extra. Simulated in a fresh interpreter
where the optional packages cannot be imported (a meta-path finder refuses them), since CI cannot
uninstall them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

# Every package an extra brings in (trainer: safetensors, tqdm, matplotlib; integrations: transformers, trl
# and what they pull), refused in the child interpreter.
OPTIONAL = (
    "transformers", "trl", "datasets", "tokenizers", "accelerate", "safetensors", "tqdm", "matplotlib",
)  # fmt: skip

PRELUDE = f"""
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ImportError(f"No module named {{name!r}} (refused by the test)")
        return None
sys.meta_path.insert(0, _Refuse())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)  # fmt: skip


def test_extras_cover_the_optional_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for e in ("trainer", "integrations")
             for req in extras[e]}  # fmt: skip
    assert names <= set(OPTIONAL), names - set(OPTIONAL)


def test_core_works_without_any_extra():
    out = run(
        """
        import torch, fdistill, fdistill.compat, fdistill.topk, fdistill.trainer, fdistill.integrations
        s, t = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7)
        fdistill.divergence_loss(s, t, "jsd").backward()
        assert s.grad is not None
        ids, lp = fdistill.topk.topk_from_logits(t, 3)
        fdistill.divergence_loss(s, teacher_topk=(ids, lp))
        fdistill.compat.LigerJSD()(s.log_softmax(-1), t.log_softmax(-1))
        bad = set(sys.modules) & set({optional!r})
        assert not bad, sorted(bad)
        print("ok")
    """.replace("{optional!r}", repr(OPTIONAL))
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_what_needs_an_extra_names_it(tmp_path):
    out = run(f"""
        import fdistill.topk as topk
        for call in (lambda: topk.write_topk({str(tmp_path)!r}, [], lambda x: x, k=1, vocab_size=2),
                     lambda: topk.TopKDataset({str(tmp_path)!r})):
            try:
                call()
            except ImportError as e:
                print(e)
        try:
            from fdistill.integrations import FdistillDistillationTrainer
        except ImportError as e:
            print(e)
        try:
            from fdistill.integrations import TeacherHackingCallback
        except ImportError as e:
            print(e)
    """)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4, out.stdout
    assert "fdistill[trainer]" in lines[0] and "safetensors" in lines[0]
    assert "fdistill[trainer]" in lines[1]
    assert all("fdistill[integrations]" in line for line in lines[2:]), lines
    assert not list(tmp_path.iterdir())  # nothing written before the error
