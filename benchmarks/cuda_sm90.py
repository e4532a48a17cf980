"""Register, shared-memory and spill report of every CUDA kernel, compiled for sm_90 (no GPU needed).

``python -m benchmarks.cuda_sm90 [--arch sm_90] [--nvcc nvcc]`` compiles each ``csrc/**/*.cu`` with
``nvcc -Xptxas -v`` (the defines torch's CUDA extension build adds, so the code compiled is the one
shipped), parses ptxas' per-function report, prints a Markdown table and a last line
``N CUDA kernels compiled for sm_90, S spills`` (S: kernels with spill stores or loads). Exits 1 on a
compile error or a spill in a hot kernel (HOT), 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS: the build compiles the .cu files with these
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
HOT = re.compile(r"fdiv_(forward|backward)_kernel")  # kernels on the training path: no spill allowed

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[dict]:
    """One dict per entry function: name (mangled), registers, smem, stack, spill_stores, spill_loads."""
    kernels, current, props = [], None, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {"name": m.group(1), "registers": 0, "smem": 0, "stack": 0, "spill_stores": 0,
                       "spill_loads": 0}  # fmt: skip
            kernels.append(current)
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _SPILL.search(line)) and current and props == current["name"]:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif (m := _USED.search(line)) and current:
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
            current = None  # the entry's report ends here
    return kernels


def enum_names(root: Path) -> dict[tuple[str, str], str]:
    """(Enum, "N") -> "Enum::Name" for the numbered enums of the headers (c++filt prints (ns::Enum)N)."""
    names = {}
    for header in root.glob("csrc/**/*.h"):
        text = re.sub(r"//[^\n]*", "", header.read_text())
        for enum, body in re.findall(r"enum class (\w+)\s*:\s*\w+\s*\{(.*?)\};", text, re.S):
            for item, value in re.findall(r"(\w+)\s*=\s*(\d+)", body):
                names[enum, value] = f"{enum}::{item}"
    return names


def short_names(mangled: list[str], root: Path = ROOT) -> list[str]:
    """Demangled with c++filt (namespaces, 'void' and the argument list dropped), else the mangled names."""
    if not mangled or shutil.which("c++filt") is None:
        return mangled
    out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True)
    enums = enum_names(root)
    shorts = []
    for name in out.stdout.splitlines():
        name = re.sub(r"^void ", "", name)
        name = re.sub(r"\([^()]*\)$", "", name)  # the parameters
        name = re.sub(r"\w+::\(anonymous namespace\)::|\b(?:fdistill|cuda)::", "", name)
        name = re.sub(r"\((?:\w+::)*(\w+)\)(\d+)", lambda m: enums.get(m.groups(), m.group(0)), name)
        shorts.append(name)
    return shorts


def compile_cu(path: Path, arch: str, nvcc: str) -> tuple[int, str]:
    cmd = [nvcc, "-std=c++17", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", f"-arch={arch}",
           "-Xptxas", "-v", *TORCH_NVCC_FLAGS, "-c", str(path), "-o", "/dev/null"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


COLUMNS = ("registers", "smem", "spill_stores", "spill_loads")


def table(kernels: list[dict]) -> str:
    lines = ["| kernel | registers | shared memory (B) | spill stores (B) | spill loads (B) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for k in kernels:
        lines.append("| " + " | ".join([f"`{k['short']}`"] + [str(k[c]) for c in COLUMNS]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--nvcc", default="nvcc")
    args = parser.parse_args(argv)
    if shutil.which(args.nvcc) is None:
        print(f"{args.nvcc} not found", file=sys.stderr)
        return 1
    sources = sorted(ROOT.glob("csrc/**/*.cu"))
    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda p: compile_cu(p, args.arch, args.nvcc), sources))
    kernels, failed = [], False
    for path, (rc, output) in zip(sources, results, strict=True):
        if rc != 0:
            print(f"nvcc failed on {path.relative_to(ROOT)}:\n{output}", file=sys.stderr)
            failed = True
        kernels += parse_ptxas(output)
    for k, short in zip(kernels, short_names([k["name"] for k in kernels]), strict=True):
        k["short"] = short
    kernels.sort(key=lambda k: k["short"])
    print(table(kernels))
    spilling = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    hot = [k["short"] for k in spilling if HOT.search(k["short"]) or HOT.search(k["name"])]
    print(f"\n{len(kernels)} CUDA kernels compiled for {args.arch}, {len(spilling)} spills")
    if hot:
        print("spills in hot kernels: " + ", ".join(hot), file=sys.stderr)
    return 1 if failed or hot else 0


if __name__ == "__main__":
    sys.exit(main())
