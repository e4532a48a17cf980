"""Compiles every Triton kernel configuration the launchers can pick ahead of time for sm_90.

    python -m benchmarks.aot_sm90            # all kernels; table + "N kernels compiled for sm_90, S spills"
    python -m benchmarks.aot_sm90 --only divergence --jobs 2 --csv regs.csv

No GPU is needed: ``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` lowers to PTX and runs
Triton's bundled ptxas. For each kernel it reports registers per thread, shared memory and spilled
bytes (``ptxas -v``: spill stores + loads; registers saved around a subroutine call, the float64
division's slow path in the solver's per-row scalar code, are reported apart). It exits non-zero on a compile
error or a spill. The configurations are enumerated from the launchers' own tiling functions over
every vocabulary size class, so a tile or warp count added there is compiled here too.

The kernels are compiled as the JIT specialises them for LLM shapes: pointers 16-byte aligned and
the vocabulary size and row strides divisible by 16 (V = 32000, 128256, ...).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import product

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter replaces the compiler
    raise SystemExit("benchmarks.aot_sm90 compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fdistill.fdiv_ops import MODE_FY, MODE_SOFTARGMAX, MODE_SOFTMAX, SHARD_PROBS, SHARD_SUMS  # noqa: E402
from fdistill.ops import TWO_PASS_DIVERGENCES  # noqa: E402
from fdistill.triton import divergence as tdiv  # noqa: E402
from fdistill.triton import fdiv as tfdiv  # noqa: E402
from fdistill.triton.fdiv_math import F_CODES  # noqa: E402
from fdistill.triton.math import DIVERGENCE_CODES  # noqa: E402
from fdistill.triton.tiles import DIVERGENCE_TILE, FDIV_TILE, tile_classes, tiling  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Config:
    """One kernel variant: its arguments' types (``constexpr`` entries carry their value)."""

    family: str
    kernel: str
    label: str
    args: dict  # name -> Triton type string, or ("constexpr", value)
    num_warps: int
    aligned: tuple = ()  # integer / pointer arguments specialised as divisible by 16
    options: dict = field(default_factory=dict)


def _tiles(dtype, wide=DIVERGENCE_TILE, kind=None):
    """The (BLOCK, num_warps) pairs the launchers pick for rows of ``dtype`` (fdistill.triton.tiles)."""
    return sorted({tiling(v, dtype, wide, kind) for v in tile_classes()})


def _acc(dtype):
    return triton.language.float64 if dtype == torch.float64 else triton.language.float32


def _acc_ptr(dtype):
    return "*fp64" if dtype == torch.float64 else "*fp32"


def divergence_configs():
    """Every (divergence, dtype, labels, BLOCK, num_warps) the divergence launchers can pick: the
    forward (with and without the one-pass gradient), the backward, and the vocabulary-parallel
    partial / second / finish kernels."""
    for dtype in DTYPES:
        for kind, code in DIVERGENCE_CODES.items():
            second = ("second",) if kind in TWO_PASS_DIVERGENCES else ()
            one_pass = ("fwd_grad",) if dtype in tdiv.ONE_PASS_DTYPES else ()  # float64: two launches
            for op in ("fwd", *one_pass, "bwd", "partial", *second):
                for block, warps in _tiles(dtype, kind=kind):
                    for labels in (False, True):
                        yield _divergence_config(kind, code, dtype, op, labels, block, warps)
            if dtype in (torch.float32, torch.float64):  # finish: the accumulation dtype only
                for has_second in (False, True):
                    yield _finish_config(kind, code, dtype, has_second)


def _finish_config(kind, code, dtype, has_second):
    acc = _acc_ptr(dtype)
    args = {"PARTS": "*fp64", "SECOND": "*fp64" if has_second else ("constexpr", None), "LOSS": acc,
            "STATS": acc, "param": "fp64", "parts": "i32", "rows": "i32", "DIV": ("constexpr", code),
            "HAS_SECOND": ("constexpr", has_second)}  # fmt: skip
    label = f"{kind} finish {str(dtype)[6:]}{' second' if has_second else ''} w1"
    aligned = ("PARTS", "SECOND", "LOSS", "STATS")
    return Config("divergence", "_divergence_finish_kernel", label, args, 1, aligned,
                  {"enable_fp_fusion": tdiv.FP_FUSION})  # fmt: skip


def _divergence_config(kind, code, dtype, op, labels, block, warps):
    ptr, acc = PTR[dtype], _acc_ptr(dtype)
    lab = "*i64" if labels else ("constexpr", None)
    scalars = {"inv_t": "fp64", "param": "fp64", "log_wt": "fp64", "log_ws": "fp64"}
    const = {"DIV": ("constexpr", code), "HAS_LABELS": ("constexpr", labels), "BLOCK": ("constexpr", block)}
    rows = ("V", "stride_s", "stride_t")
    if op == "bwd":
        name = "_divergence_bwd_kernel"
        args = {"GRAD_LOSS": acc, "S": ptr, "T": ptr, "LABELS": lab, "STATS": acc, "GRAD": ptr, **scalars,
                "V": "i32", "stride_s": "i32", "stride_t": "i32", "stride_grad": "i32", "stride_gl": "i32",
                "ignore_index": "i32", **const}  # fmt: skip
        aligned = ("GRAD_LOSS", "S", "T", "LABELS", "STATS", "GRAD", *rows, "stride_grad")
    elif op == "partial":
        name = "_divergence_partial_kernel"
        accc = ("constexpr", triton.language.float64 if dtype == torch.float64 else triton.language.float32)
        args = {"S": ptr, "T": ptr, "LABELS": lab, "PARTS": "*fp64", "inv_t": "fp64", "param": "fp64",
                "V": "i32", "stride_s": "i32", "stride_t": "i32", "ignore_index": "i32", **const,
                "ACC": accc}  # fmt: skip
        aligned = ("S", "T", "LABELS", "PARTS", *rows)
    elif op == "second":
        name = "_divergence_second_kernel"
        args = {"S": ptr, "T": ptr, "LABELS": lab, "STATS": acc, "OUT": "*fp64", **scalars, "V": "i32",
                "stride_s": "i32", "stride_t": "i32", "ignore_index": "i32", **const}  # fmt: skip
        aligned = ("S", "T", "LABELS", "STATS", "OUT", *rows)
    else:  # the forward, with the one-pass gradient written (WRITE_GRAD) or not
        name = "_divergence_fwd_kernel"
        grad = op == "fwd_grad"
        args = {"S": ptr, "T": ptr, "LABELS": lab, "LOSS": acc, "STATS": acc,
                "GRAD": ptr if grad else ("constexpr", None), **scalars, "grad_scale": "fp64",
                "V": "i32", "stride_s": "i32", "stride_t": "i32", "stride_grad": "i32", "ignore_index": "i32",
                **const, "WRITE_GRAD": ("constexpr", grad)}  # fmt: skip
        aligned = ("S", "T", "LABELS", "LOSS", "STATS", "GRAD", *rows, "stride_grad")
    label = f"{kind} {op} {str(dtype)[6:]}{' labels' if labels else ''}"
    return Config("divergence", name, f"{label} B{block}/w{warps}", args, warps, aligned,
                  {"enable_fp_fusion": tdiv.FP_FUSION})  # fmt: skip


def fdiv_configs():
    """Every (f, mode, reference, target, dtype, BLOCK, num_warps) the f-divergence launchers can pick: the
    forward, the FY / f-softmax backward, the f-softargmax backward and the vocabulary shard kernel."""
    targets = [(MODE_SOFTARGMAX, tfdiv.NO_TARGET), (MODE_FY, tfdiv.PROB_TARGET),
               (MODE_FY, tfdiv.LABEL_TARGET), (MODE_SOFTMAX, tfdiv.NO_TARGET)]  # fmt: skip
    for dtype, (f, code), has_ref, (mode, kind) in product(DTYPES, F_CODES.items(), (False, True), targets):
        for tile in _tiles(dtype, FDIV_TILE):
            yield _fdiv_config(f, code, dtype, mode, has_ref, kind, *tile, backward=False)
            if mode != MODE_SOFTARGMAX:  # (the softargmax's backward: _softargmax_bwd_config)
                yield _fdiv_config(f, code, dtype, mode, has_ref, kind, *tile, backward=True)
    for dtype, (f, code), has_ref in product(DTYPES, F_CODES.items(), (False, True)):
        for tile in _tiles(dtype, FDIV_TILE):
            yield _softargmax_bwd_config(f, code, dtype, has_ref, *tile)
            for mode in (SHARD_SUMS, SHARD_PROBS):
                yield _shard_config(f, code, dtype, has_ref, mode, *tile)


def _softargmax_bwd_config(f, code, dtype, has_ref, block, warps):
    ptr, acc = PTR[dtype], _acc_ptr(dtype)
    args = {"GRAD": ptr, "P": ptr, "REF": acc if has_ref else ("constexpr", None), "OUT": ptr,
            "alpha": "fp64", "inv_t": "fp64", "ref_value": "fp64", "V": "i32", "stride_g": "i32",
            "stride_p": "i32", "stride_q": "i32", "stride_out": "i32", "F": ("constexpr", code),
            "HAS_REF": ("constexpr", has_ref), "BLOCK": ("constexpr", block),
            "ACC": ("constexpr", _acc(dtype))}  # fmt: skip
    label = f"{f} softargmax-bwd {str(dtype)[6:]}{' ref' if has_ref else ''} B{block}/w{warps}"
    aligned = ("GRAD", "P", "REF", "OUT", "V", "stride_g", "stride_p", "stride_out")
    return Config("fdiv", "_softargmax_bwd_kernel", label, args, warps, aligned, {"enable_fp_fusion": False})


def _shard_config(f, code, dtype, has_ref, mode, block, warps):
    ptr, acc = PTR[dtype], _acc_ptr(dtype)
    args = {"LOGITS": ptr, "REF": acc if has_ref else ("constexpr", None), "STATS": acc,
            "OUT": "*fp64" if mode == SHARD_SUMS else acc, "inv_t": "fp64", "alpha": "fp64",
            "inv_am1": "fp64", "ref_value": "fp64", "V": "i32", "stride_l": "i32", "stride_q": "i32",
            "stride_out": "i32",
            "F": ("constexpr", code), "MODE": ("constexpr", mode), "HAS_REF": ("constexpr", has_ref),
            "BLOCK": ("constexpr", block)}  # fmt: skip
    label = f"{f} shard{mode} {str(dtype)[6:]}{' ref' if has_ref else ''} B{block}/w{warps}"
    aligned = ("LOGITS", "REF", "STATS", "OUT", "V", "stride_l")
    return Config("fdiv", "_fdiv_shard_kernel", label, args, warps, aligned, {"enable_fp_fusion": False})


def _fdiv_config(f, code, dtype, mode, has_ref, kind, block, warps, backward):
    ptr, acc = PTR[dtype], _acc_ptr(dtype)
    ref = acc if has_ref else ("constexpr", None)
    # probability targets of the logits' dtype (the common case; other dtypes are converted alike)
    target = ptr if kind == tfdiv.PROB_TARGET else ("constexpr", None)
    labels = "*i64" if kind == tfdiv.LABEL_TARGET else ("constexpr", None)
    scalars = {"inv_t": "fp64", "alpha": "fp64", "inv_am1": "fp64", "ref_value": "fp64", "tol": "fp64"}
    const = {"F": ("constexpr", code), "HAS_REF": ("constexpr", has_ref),
             "TARGET_KIND": ("constexpr", kind), "BLOCK": ("constexpr", block)}  # fmt: skip
    if backward:
        name = "_fdiv_bwd_kernel"
        args = {"GRAD_ROWS": acc, "LOGITS": ptr, "REF": ref, "TARGET": target, "LABELS": labels, "STATS": acc,
                "GRAD": ptr, **scalars, "V": "i32", "stride_gr": "i32", "stride_l": "i32", "stride_q": "i32",
                "stride_y": "i32", "stride_g": "i32", "ignore_index": "i32", **const}  # fmt: skip
        aligned = ("GRAD_ROWS", "LOGITS", "REF", "TARGET", "LABELS", "STATS", "GRAD", "V", "stride_l",
                   "stride_g")  # fmt: skip
    else:
        name = "_fdiv_fwd_kernel"
        out = ptr if mode == MODE_SOFTARGMAX else acc
        args = {"LOGITS": ptr, "REF": ref, "TARGET": target, "LABELS": labels, "OUT": out, "STATS": acc,
                **scalars, "V": "i32", "stride_l": "i32", "stride_q": "i32", "stride_y": "i32",
                "stride_out": "i32", "ignore_index": "i32", "max_sweeps": "i32",
                "MODE": ("constexpr", mode), **const}  # fmt: skip
        aligned = ("LOGITS", "REF", "TARGET", "LABELS", "OUT", "STATS", "V", "stride_l")
    target_name = {tfdiv.NO_TARGET: "", tfdiv.PROB_TARGET: " probs", tfdiv.LABEL_TARGET: " labels"}[kind]
    label = (f"{f} {'bwd' if backward else 'fwd'} mode{mode} {str(dtype)[6:]}{' ref' if has_ref else ''}"
             f"{target_name} B{block}/w{warps}")  # fmt: skip
    return Config("fdiv", name, label, args, warps, aligned, {"enable_fp_fusion": False})


KERNELS = {
    "_divergence_fwd_kernel": tdiv._divergence_fwd_kernel,
    "_divergence_bwd_kernel": tdiv._divergence_bwd_kernel,
    "_divergence_partial_kernel": tdiv._divergence_partial_kernel,
    "_divergence_second_kernel": tdiv._divergence_second_kernel,
    "_divergence_finish_kernel": tdiv._divergence_finish_kernel,
    "_fdiv_fwd_kernel": tfdiv._fdiv_fwd_kernel,
    "_fdiv_bwd_kernel": tfdiv._fdiv_bwd_kernel,
    "_softargmax_bwd_kernel": tfdiv._softargmax_bwd_kernel,
    "_fdiv_shard_kernel": tfdiv._fdiv_shard_kernel,
}


def _ptxas_usage(ptx: str, fp_fusion: bool) -> dict:
    """Registers and spilled bytes of the kernel, from ``ptxas -v`` for sm_90a on Triton's PTX.

    ptxas is rerun with its default register allocation: Triton >= 3.9 adds
    ``--regAllocOptLevel=2`` (a workaround for a ptxas 13 bug) which, at unchanged register counts,
    leaves up to a few dozen bytes of stack on some kernels; the GPU machine's Triton may not."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not os.path.exists(tool):  # older Triton: one ptxas for every architecture
        tool = tool.removesuffix("-blackwell")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        flags = [] if fp_fusion else ["--fmad=false"]
        cubin = os.path.join(tmp, "k.cubin")
        cmd = [tool, "-v", *flags, "--gpu-name=sm_90a", src, "-o", cubin]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        dump = os.path.join(os.path.dirname(tool), "cuobjdump")
        sass = subprocess.run([dump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    spilled = sum(map(int, spills.groups())) if spills else 0
    # A kernel that calls a subroutine (the IEEE float64 division's slow path, once per row in the
    # solver's scalar code) saves a few live registers to the stack around the call: ptxas counts
    # them as spills, but they are not register pressure; reported apart.
    calls = sass.count("CALL.REL")
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill": 0 if calls else spilled,
        "call_saves": spilled if calls else 0,
        "stack": int(stack.group(1)) if stack else 0,
    }


def compile_one(cfg: Config) -> dict:
    fn = KERNELS[cfg.kernel]
    names = list(cfg.args)
    signature = {n: ("constexpr" if isinstance(t, tuple) else t) for n, t in cfg.args.items()}
    constexprs = {n: t[1] for n, t in cfg.args.items() if isinstance(t, tuple)}
    runtime = [n for n in cfg.aligned if not isinstance(cfg.args[n], tuple)]  # not a constexpr None
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in runtime}
    start = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=TARGET, options={"num_warps": cfg.num_warps, **cfg.options})
        usage = _ptxas_usage(compiled.asm["ptx"], cfg.options.get("enable_fp_fusion", True))
        usage["shared"] = compiled.metadata.shared
        error = None
    except Exception as e:  # a compile error is a result: reported in the table, non-zero exit
        usage, error = {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {
        "family": cfg.family, "kernel": cfg.label, "warps": cfg.num_warps, "regs": usage.get("regs"),
        "shared": usage.get("shared"), "local": usage.get("spill", 0), "stack": usage.get("stack", 0),
        "call_saves": usage.get("call_saves", 0),
        "seconds": time.perf_counter() - start, "error": error,
    }  # fmt: skip


def all_configs(only=None):
    families = {"divergence": divergence_configs, "fdiv": fdiv_configs}
    for name, gen in families.items():
        if only in (None, name):
            yield from gen()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["divergence", "fdiv"], help="one family of kernels")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--csv", help="also write the table as CSV to this path")
    p.add_argument("--match", help="only the kernels whose label contains this text")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # set explicitly per kernel; silences a warning
    configs = [c for c in all_configs(args.only) if not args.match or args.match in c.label]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(compile_one, configs, chunksize=4))
    results.sort(key=lambda r: (r["family"], r["kernel"]))

    from benchmarks.harness import format_table

    headers = ["kernel", "warps", "registers", "shared B", "spill B", "call saves B", "error"]
    rows = [[r["kernel"], str(r["warps"]), str(r["regs"]), str(r["shared"]), str(r["local"]),
             str(r["call_saves"]), r["error"] or ""] for r in results]  # fmt: skip
    print(format_table(headers, rows))
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(headers)
            w.writerows(rows)
    errors = [r for r in results if r["error"]]
    spills = [r for r in results if r["local"]]
    worst = max((r["regs"] or 0 for r in results), default=0)
    print(f"\nmost registers: {worst}; {time.perf_counter() - start:.0f} s with {args.jobs} jobs")
    for r in errors:
        print(f"compile error: {r['kernel']}: {r['error']}", file=sys.stderr)
    for r in spills:
        print(f"spill: {r['kernel']}: {r['local']} bytes spilled (stores + loads)", file=sys.stderr)
    saves = [r["call_saves"] for r in results if r["call_saves"]]
    if saves:
        what = "around the float64 division's slow-path call"
        print(f"{len(saves)} kernels save {min(saves)}-{max(saves)} B {what}")
    print(f"{len(results) - len(errors)} kernels compiled for sm_90, {len(spills)} spills")
    return 1 if errors or spills else 0


if __name__ == "__main__":
    sys.exit(main())
