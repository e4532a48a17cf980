"""Timing and peak-memory helpers shared by the benchmarks (CPU)."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak resident memory that ``fn()`` adds above what is resident when it starts (Linux).

    Resets the process's high-water mark (``/proc/self/clear_refs``) first; the inputs are expected
    to be allocated (and touched) before the call. Returns None where the kernel does not support it.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def write_csv(path, headers: list[str], rows: list[list[str]]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)


class Report:
    """Tables written as Markdown (every table, one file) and CSV (one file per table name).

    Both files are rewritten after every row, so a run cut short (time budget, a killed process)
    keeps what it measured. With ``append`` an existing Markdown file and CSVs of the same header are
    kept and added to (several processes of one GPU check write into one folder).
    """

    def __init__(self, out_dir, md_name: str, preamble: list[str] = (), append: bool = False):
        from pathlib import Path

        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.md_path = self.out / md_name
        self.append = append
        self.md_prefix = self.md_path.read_text() if append and self.md_path.exists() else ""
        self.preamble = [] if self.md_prefix else list(preamble)
        self.sections: list[dict] = []
        self.csv_prefix: dict[str, list[list[str]]] = {}

    def table(self, name: str, title: str, headers: list[str], notes: list[str] = ()) -> dict:
        """A new table; rows of tables with the same ``name`` (same headers) share ``name.csv``."""
        if name not in self.csv_prefix:
            self.csv_prefix[name] = self._existing_csv_rows(name, headers)
        section = {"name": name, "title": title, "headers": headers, "notes": list(notes), "rows": []}
        self.sections.append(section)
        print(f"\n## {title}", *section["notes"], " | ".join(headers), sep="\n", flush=True)
        self._write(name)
        return section

    def add(self, section: dict, row: list[str]) -> None:
        section["rows"].append([str(c) for c in row])
        print(" | ".join(section["rows"][-1]), flush=True)
        self._write(section["name"])

    def print_table(self, section: dict) -> None:
        if section["rows"]:
            print(f"\n{format_table(section['headers'], section['rows'])}\n", flush=True)

    def _existing_csv_rows(self, name, headers):
        import csv

        path = self.out / f"{name}.csv"
        if not (self.append and path.exists()):
            return []
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        return rows[1:] if rows and rows[0] == list(headers) else []

    def _write(self, name: str) -> None:
        parts = [self.md_prefix.rstrip("\n")] if self.md_prefix else []
        parts += [f"- {line}" for line in self.preamble]
        for s in self.sections:
            body = format_table(s["headers"], s["rows"]) if s["rows"] else "(no rows)"
            parts += [f"\n## {s['title']}\n", *(f"{n}  " for n in s["notes"]), "", body]
        self.md_path.write_text("\n".join(parts).lstrip("\n") + "\n")
        same = [s for s in self.sections if s["name"] == name]
        rows = self.csv_prefix[name] + [r for s in same for r in s["rows"]]
        write_csv(self.out / f"{name}.csv", same[0]["headers"], rows)


def environment_lines() -> list[str]:
    """Python, torch (its CUDA), Triton, the GPU and its driver, fdistill and the git commit."""
    import platform
    import subprocess

    import torch

    def run(*cmd):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
            return lines[0] if lines else None
        except (OSError, subprocess.SubprocessError):
            return None

    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:  # a broken triton is worth reporting, not a crash
        triton_version = f"not importable ({type(err).__name__})"
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton_version}"
    ]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        driver = run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or "unknown"
        lines.append(
            f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
            f"{p.multi_processor_count} SMs; driver {driver}"
        )
    else:
        lines.append("GPU: none (CPU run)")
    try:
        import fdistill

        lines.append(
            f"fdistill {fdistill.__version__}: CPU kernels {fdistill.has_cpu_kernels()}, "
            f"CUDA kernels {fdistill.has_cuda_kernels()}"
        )
    except Exception as err:  # reported, as above
        lines.append(f"fdistill not importable: {type(err).__name__}: {err}")
    lines.append(f"git commit {run('git', 'rev-parse', '--short', 'HEAD') or 'unknown'}")
    return lines
