"""The project carries its own math: no tracked file cites notes that live outside the repository.

The formulas are in docs/divergences.md and docs/algorithms.md; a citation of a path outside the
checkout (which no user has) must not come back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# (split so that a plain grep for the patterns does not find this file)
FORBIDDEN = (b"../" + b"shared", b"shared" + b"/reference", b"shared" + b"/seeds")
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout (or git is missing): no tracked files to check")
    return [name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


def test_no_tracked_text_file_cites_outside_the_repo():
    offenders = []
    for name in _tracked_files():
        if name == THIS_FILE:
            continue
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (images)
            continue
        for lineno, line in enumerate(data.splitlines(), 1):
            for pattern in FORBIDDEN:
                if pattern in line:
                    offenders.append(f"{name}:{lineno}: {line.decode('utf-8', 'replace').strip()}")
    assert not offenders, (
        "files cite paths outside the repository (cite docs/divergences.md or docs/algorithms.md "
        "instead):\n" + "\n".join(offenders)
    )
