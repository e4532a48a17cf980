"""The GPU check's bench call, dry-run on CPU (``benchmarks/gpu_check.sh dry-run``), and its guards.

The GPU is lent rarely and briefly: the script must work the first time there. The dry run goes
through the same steps, tables and files with tiny shapes; the unit tests check the failure
handling that a CPU run never meets (out of memory, a broken Liger install, a spent budget) and
that the ``grad_in_place`` row times the loss on the logits, not on the gradient of a previous call.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fdistill

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the benchmarks package, when pytest runs from elsewhere

from benchmarks import bench_gpu, device_bench, liger_baselines  # noqa: E402

TOKENS = "1"  # one token count: the Triton interpreter runs every row (the GPU call has two)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_DRY_TOKENS": TOKENS}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out, done.stdout


def test_files_are_the_planned_few(dry_run):
    out, _ = dry_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench.md", "divergence.csv", "fdiv.csv", "fused_linear.csv", "gpu_dry_run.log"]
    assert len(names) <= 8  # what comes back from a device call


def test_log_has_versions_and_summary(dry_run):
    out, stdout = dry_run
    log = (out / "gpu_dry_run.log").read_text()
    assert log == stdout
    assert log.startswith("== versions\npython ")
    assert "torch" in log and "triton" in log and "GPU: none (CPU run)" in log
    steps = ("divergence and f-divergence tables: ok", "fused-linear table: ok", "torch.compile rows: ok")
    assert all(step in log for step in steps)
    if liger_baselines.load() is None:  # (Liger's KL and TV kernels fail under the Triton interpreter)
        assert "error:" not in log and "Traceback" not in log


def test_divergence_csv(dry_run):
    out, log = dry_run
    headers, rows = read_csv(out / "divergence.csv")
    assert headers == bench_gpu.DIVERGENCE_HEADERS
    impls = ["fdistill triton", "fdistill triton, grad in place", "eager (fp32 log_softmax)",
             "torch.compile (eager)"]  # fmt: skip
    if liger_baselines.load() is None:
        assert "liger-kernel unavailable, its rows are dropped" in log
    for divergence in fdistill.DIVERGENCES:
        mine = {r["impl"]: r for r in rows if r["divergence"] == divergence and r["tokens"] == TOKENS}
        assert set(impls) <= set(mine), (divergence, sorted(mine))
        losses = {impl: float(mine[impl]["loss"]) for impl in impls}
        want = losses["eager (fp32 log_softmax)"]
        for impl, loss in losses.items():
            assert loss == pytest.approx(want, rel=1e-3, abs=1e-5), (divergence, impl)
        for impl in impls:
            for column in ("fwd ms", "fwd+bwd ms", "peak GB"):
                float(mine[impl][column])  # a number, not OOM / error / skipped
        assert mine["torch.compile (eager)"]["compile s"] != "-"
        assert mine["eager (fp32 log_softmax)"]["fwd+bwd % floor"].endswith("%")


def test_fdiv_csv(dry_run):
    out, log = dry_run
    headers, rows = read_csv(out / "fdiv.csv")
    assert headers == bench_gpu.FDIV_HEADERS
    keys = {(r["operator"], r["backend"], r["target"]) for r in rows}
    assert {("softmax (torch)", "-", "-"), ("cross_entropy (torch)", "-", "labels"),
            ("cross_entropy (torch)", "-", "probs"), ("fy_loss", "triton", "labels"),
            ("fy_loss", "triton", "probs"), ("f_softargmax (alpha 1.5)", "triton", "-")} <= keys  # fmt: skip
    assert "f-divergence CUDA backend rows skipped" in log
    for r in rows:
        float(r["ms"])


def test_fused_linear_csv(dry_run):
    out, _ = dry_run
    from benchmarks.bench_fused_linear import HEADERS

    headers, rows = read_csv(out / "fused_linear.csv")
    assert headers == HEADERS
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        mine = {r["implementation"]: r for r in rows if r["divergence"] == divergence}
        assert {"materialised (fdistill)", "materialised (eager)", "fused-linear (fdistill)"} <= set(mine)
        losses = [float(r["loss"]) for name, r in mine.items() if not name.startswith("liger")]
        assert max(losses) == pytest.approx(min(losses), rel=2e-2)  # bf16 logits vs chunked bf16


def test_markdown_has_every_table(dry_run):
    out, _ = dry_run
    md = (out / "bench.md").read_text()
    assert md.startswith("- python ")
    shape = f"{TOKENS} x 256 bf16"
    titles = (
        f"## Divergences, {shape}",
        f"## f-divergence operators, {shape}",
        f"## Fused-linear losses, {TOKENS} tokens",
        f"## Divergences, {shape}, torch.compile",
    )
    for title in titles:
        assert title in md, title
    assert "| fdistill triton, grad in place" in md and "| fused-linear (fdistill)" in md


# ------------------------------------------------------------------ the guards, in-process


def cpu_run(**kwargs):
    return SimpleNamespace(timer=device_bench.Timer("cpu", cpu_reps=3), budget=device_bench.Budget(None),
                           device=torch.device("cpu"), **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    "err, cell",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"), "OOM"),
        (RuntimeError("CUDA error: out of memory"), "OOM"),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "error"),
        (ValueError("bad"), "error"),
    ],
)
def test_guarded_turns_failures_into_cells(err, cell, capsys):
    def fail():
        raise err

    assert device_bench.guarded("case", fail) == cell
    assert device_bench.guarded("ok", lambda: 1.5) == 1.5
    printed = capsys.readouterr().out
    assert (f"{cell}: case" if cell == "OOM" else "error: case") in printed


def test_guarded_skips_past_the_budget():
    budget = device_bench.Budget(-1.0)
    assert device_bench.guarded("late", lambda: 1 / 0, budget) == "skipped"


def test_oom_fills_the_row():
    def oom(s, t):
        raise torch.OutOfMemoryError("CUDA out of memory")

    s, t = torch.randn(2, 16), torch.randn(2, 16)
    results = bench_gpu.measure(cpu_run(), bench_gpu.Impl("oom", oom), s, t)
    assert results == {"compile s": None, "loss": "OOM", "fwd ms": "OOM", "fwd+bwd ms": "OOM", "peak": "OOM"}


@pytest.mark.skipif(not fdistill.has_cpu_kernels(), reason="grad_in_place needs a fused backend")
def test_grad_in_place_row_sees_fresh_logits():
    """Every call of the in-place row gets the logits; none the gradient a previous call wrote."""
    s, t = torch.randn(3, 64), torch.randn(3, 64)
    seen = []

    def loss(x, teacher):
        seen.append(torch.equal(x.detach(), s))
        return fdistill.divergence_loss(x, teacher, "jsd", backend="cpu", grad_in_place=x.requires_grad)

    results = bench_gpu.measure(cpu_run(), bench_gpu.Impl("in place", loss, in_place=True), s, t)
    assert len(seen) >= 5 and all(seen)
    assert results["loss"] == pytest.approx(float(fdistill.divergence_loss(s, t, "jsd")))
    seen.clear()  # without the restore the second and later backward calls see gradients
    bench_gpu.measure(cpu_run(), bench_gpu.Impl("in place, no restore", loss), s, t)
    assert not all(seen)


@pytest.mark.parametrize("raised", ["ImportError", "AttributeError", "RuntimeError"])
def test_broken_liger_drops_only_its_rows(raised, tmp_path, monkeypatch, capsys):
    package = tmp_path / "liger_kernel"
    package.mkdir()
    (package / "__init__.py").write_text(f"raise {raised}('triton has no attribute foo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("liger_kernel")]:
        monkeypatch.delitem(sys.modules, name)
    liger_baselines.load.cache_clear()
    try:
        assert liger_baselines.load() is None
        assert liger_baselines.loss_on_distributions("jsd") is None
        assert liger_baselines.fused_linear("jsd") is None
    finally:
        liger_baselines.load.cache_clear()
    assert f"liger-kernel unavailable, its rows are dropped: {raised}" in capsys.readouterr().out


def test_cuda_timer_times_fn_alone_after_its_setup(monkeypatch):
    """The CUDA-event path, with fake events: setup before every call, reps within the bounds."""
    import time

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    timer = device_bench.Timer("cpu", warmup_ms=2, rep_ms=5, min_reps=5, max_reps=50)
    log = []

    def fn():
        log.append("fn")
        time.sleep(0.001)

    ms = timer._cuda_ms(fn, setup=lambda: (log.append("setup"), time.sleep(0.05)))
    assert 0.9 < ms < 25  # the 50 ms setup is not in it
    assert log == ["setup", "fn"] * (len(log) // 2)
    assert 1 + 3 + 5 <= log.count("fn") <= 1 + 3 + 50 + 50
