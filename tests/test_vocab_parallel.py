"""Vocabulary-parallel losses (``vocab_parallel_group=``) on 1, 2 and 3 gloo processes on the CPU,
against the unsharded losses computed here on the full logits in float64.

Each group of processes runs a list of cases once (a module-scoped fixture): every worker shards the
case's tensors over the vocabulary (contiguous, rank order, uneven sizes), runs the loss and its
backward, and saves its results; the tests compare each rank's loss with the unsharded one and each
rank's gradient shard with the matching slice of the unsharded gradient. The error cases check that
every rank raises (a worker that waits in a collective makes the group time out, and the test fail).
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from utils import DIVERGENCE_CASES, assert_close_verbose, case_id, generator, make_labels, make_logits

import fdistill
from fdistill._triton_dispatch import interpreter_enabled, triton_available
from fdistill.ops import TWO_PASS_DIVERGENCES
from fdistill.reference import divergence_rows_reference, resolve_divergence

V = 1271
SIZES2 = (600, 671)
SIZES3 = (400, 271, 600)
LEAD = (3, 4)
GROUP_TIMEOUT_S = 60  # a collective that waits longer raises in the worker
JOIN_TIMEOUT_S = 240  # the whole group (start-up included); then the workers are killed

# ----------------------------------------------------------------------------- the cases


def _slices(sizes):
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


def _narrow(x, dim, sl):
    return x.narrow(dim % x.dim(), sl.start, sl.stop - sl.start).contiguous()


def _local(case, rank, sizes):
    """The case as rank ``rank`` sees it: the tensors named in ``case["shard"]`` narrowed to its
    vocabulary slice (``case["sizes"]`` may give one tensor its own sizes), then per-rank overrides."""
    out = dict(case)
    for key, dim in case.get("shard", {}).items():
        if out.get(key) is not None:
            out[key] = _narrow(out[key], dim, _slices(case.get("sizes", {}).get(key, sizes))[rank])
    out.update(case.get("per_rank", {}).get(rank, {}))
    return out


def _grads(objective, inputs):
    """d objective / d inputs, zeros for inputs the objective does not depend on (None for inputs that
    are None or do not require grad)."""
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    found = [None] * len(wanted)
    if wanted and objective.requires_grad:
        found = list(torch.autograd.grad(objective, wanted, allow_unused=True))
    by_id = {id(x): torch.zeros_like(x) if g is None else g for x, g in zip(wanted, found, strict=True)}
    return [by_id.get(id(x)) if x is not None else None for x in inputs]


def _objective(loss, case):
    return loss if loss.dim() == 0 else (loss * case["weight"].to(loss.dtype)).sum()


def _group_kw(group):
    return {} if group is None else {"vocab_parallel_group": group}


def _run_div(c, group):
    s = c["student"].clone().requires_grad_()
    t = c["teacher"].clone().requires_grad_(c["options"].get("grad_teacher", False))
    loss = fdistill.divergence_loss(s, t, c["divergence"], **c["options"], **_group_kw(group))
    gs, gt = _grads(_objective(loss, c), [s, t])
    return {"loss": loss.detach(), "grad_student": gs, "grad_teacher": gt}


def _run_fy(c, group):
    x = c["logits"].clone().requires_grad_()
    options = dict(c["options"])
    if c.get("reference") is not None:
        options["reference"] = c["reference"]
    loss = fdistill.fy_loss(x, c["target"], c["f"], **options, **_group_kw(group))
    (g,) = _grads(_objective(loss, c), [x])
    return {"loss": loss.detach(), "grad": g}


def _run_softargmax(c, group):
    x = c["logits"].clone().requires_grad_()
    p = fdistill.f_softargmax(x, c["f"], **c["options"], **_group_kw(group))
    (g,) = _grads((p * c["upstream"]).sum(), [x])
    return {"p": p.detach(), "grad": g}


def _run_softmax(c, group):
    x = c["logits"].clone().requires_grad_()
    value = fdistill.f_softmax(x, c["f"], **c["options"], **_group_kw(group))
    (g,) = _grads((value * c["weight"]).sum(), [x])
    return {"value": value.detach(), "grad": g}


def _run_fused_div(c, group):
    h = c["hidden"].clone().requires_grad_()
    w = c["weight_"].clone().requires_grad_()
    b = c["bias"].clone().requires_grad_()
    loss = fdistill.fused_linear_divergence_loss(
        h, w, student_bias=b, teacher_hidden=c.get("teacher_hidden"), teacher_weight=c.get("teacher_weight"),
        teacher_bias=c.get("teacher_bias"), teacher_logits=c.get("teacher_logits"), labels=c.get("labels"),
        **c["options"], **_group_kw(group),
    )  # fmt: skip
    dh, dw, db = _grads(_objective(loss, c), [h, w, b])
    return {"loss": loss.detach(), "grad_hidden": dh, "grad_weight": dw, "grad_bias": db}


def _run_fused_fy(c, group):
    h = c["hidden"].clone().requires_grad_()
    w = c["weight_"].clone().requires_grad_()
    b = c["bias"].clone().requires_grad_()
    options = dict(c["options"])
    if c.get("reference") is not None:
        options["reference"] = c["reference"]
    loss = fdistill.fused_linear_fy_loss(h, w, c["target"], c["f"], bias=b, **options, **_group_kw(group))
    dh, dw, db = _grads(_objective(loss, c), [h, w, b])
    return {"loss": loss.detach(), "grad_hidden": dh, "grad_weight": dw, "grad_bias": db}


RUNNERS = {
    "div": _run_div,
    "fy": _run_fy,
    "softargmax": _run_softargmax,
    "softmax": _run_softmax,
    "fused_div": _run_fused_div,
    "fused_fy": _run_fused_fy,
}
# the dimension of every result that is sharded like the inputs (the others are whole on every rank)
SHARDED_RESULTS = {
    "grad_student": -1,
    "grad_teacher": -1,
    "grad": -1,
    "p": -1,
    "grad_weight": 0,
    "grad_bias": 0,
}


def _worker(rank, world, store_path, sizes, cases, out_path):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
    )
    results = {}
    try:
        group = dist.group.WORLD
        for name, case in cases.items():
            local = _local(case, rank, sizes)
            try:
                results[name] = ("ok", RUNNERS[case["kind"]](local, group))
            except Exception as exc:  # recorded: the error cases expect one on every rank
                results[name] = ("error", type(exc).__name__, str(exc), traceback.format_exc())
    finally:
        torch.save(results, f"{out_path}.tmp")
        os.replace(f"{out_path}.tmp", out_path)
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's teardown, where a worker of the error
    # cases was once seen aborting ("terminate called without an active exception": a C++ thread
    # still joinable at exit) after writing everything, in one full-suite run out of several.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_group(sizes, cases, directory) -> list[dict]:
    """Every case on ``len(sizes)`` gloo processes; each rank's results, in rank order."""
    world = len(sizes)
    ctx = mp.get_context("spawn")
    outs = [os.path.join(directory, f"rank{r}.pt") for r in range(world)]
    procs = [
        ctx.Process(target=_worker, args=(r, world, os.path.join(directory, "store"), sizes, cases, outs[r]))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    start = time.monotonic()
    for p in procs:
        p.join(max(1.0, JOIN_TIMEOUT_S - (time.monotonic() - start)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    if hung:
        pytest.fail(
            f"ranks {hung} of a {world}-process group did not finish within {JOIN_TIMEOUT_S} s (hang)"
        )
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"worker exit codes {codes}"
    return [torch.load(o, weights_only=False) for o in outs]


def _as64(case):
    """The case with its floating tensors in float64 (the ground truth's inputs)."""
    return {
        k: v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v
        for k, v in case.items()
    }


def _expected(case, dtype=torch.float64):
    """The unsharded results (the default backend: a case's ``backend`` is the sharded call's)."""
    c = _as64(case) if dtype == torch.float64 else dict(case)
    c["options"] = {k: v for k, v in c["options"].items() if k != "backend"}
    return RUNNERS[case["kind"]](c, None)


# --- case builders


def div_case(divergence, options, seed, dtype=torch.float64, shape=(*LEAD, V), reduction="mean",
             weight_seed=None, **make):  # fmt: skip
    student, teacher = make_logits(shape, dtype, seed=seed, **make)
    options = dict(options, reduction=reduction)
    weight = torch.rand(shape[:-1], generator=generator(seed + 7), dtype=torch.float64) + 0.5
    return {"kind": "div", "student": student, "teacher": teacher, "divergence": divergence,
            "options": options, "weight": weight, "shard": {"student": -1, "teacher": -1}}  # fmt: skip


def _param_cycle(i):
    """Options that vary from case to case: temperature, reduction, labels, -inf entries, teacher grad."""
    return {
        "temperature": (1.0, 1.7)[i % 2],
        "reduction": ("mean", "sum", "none")[i % 3],
        "labels": i % 2 == 0,
        "neg_inf_frac": 0.1 if i % 4 == 1 else 0.0,
        "grad_teacher": i % 3 == 1,
        "scale": i == 5,
    }


def _divergence_cases():
    cases = {}
    for i, (divergence, options) in enumerate(DIVERGENCE_CASES):
        p = _param_cycle(i)
        opts = dict(options, temperature=p["temperature"], grad_teacher=p["grad_teacher"])
        if p["scale"]:
            opts["scale_by_temperature_squared"] = True
        if p["labels"]:
            opts["labels"] = make_labels(LEAD, seed=i, vocab=V)
        cases["div:" + case_id((divergence, options))] = div_case(
            divergence, opts, seed=100 + i, reduction=p["reduction"], neg_inf_frac=p["neg_inf_frac"]
        )
    return cases


def special_rows_case(divergence, options, seed):
    """Rows: padding (all -inf), a NaN, a teacher without a distribution, the first rank's shard all
    -inf in both, a student all -inf on the first shard only, and normal rows."""
    c = div_case(divergence, options, seed, shape=(7, V), reduction="none")
    s, t = c["student"], c["teacher"]
    s[0], t[0] = -math.inf, -math.inf
    s[1, 700] = math.nan
    t[2] = -math.inf
    s[3, :600], t[3, :600] = -math.inf, -math.inf
    s[4, :600] = -math.inf
    return c


def fy_case(f, options, seed, target="labels", reference=None, dtype=torch.float64, shape=(*LEAD, V),
            neg_inf_frac=0.0, reduction="mean"):  # fmt: skip
    logits, teacher = make_logits(shape, dtype, seed=seed, neg_inf_frac=neg_inf_frac)
    live = logits > -math.inf
    if target == "labels":
        scores = torch.rand(shape, generator=generator(seed + 3), dtype=torch.float64)
        y = torch.where(live, scores, -1.0).argmax(-1)  # on live entries
        y = y.masked_fill(make_labels(shape[:-1], seed=seed, vocab=V) == -100, -100)
    else:
        y = torch.softmax(torch.where(live, teacher.double(), -math.inf), -1).to(dtype)
    weight = torch.rand(shape[:-1], generator=generator(seed + 7), dtype=torch.float64) + 0.5
    options = dict(options, reduction=reduction)
    case = {"kind": "fy", "logits": logits, "target": y, "f": f, "options": options, "weight": weight,
            "shard": {"logits": -1}}  # fmt: skip
    if target != "labels":
        case["shard"]["target"] = -1
    if reference is not None:
        case["reference"] = reference
        case["shard"]["reference"] = -1
    return case


def _positive_reference(seed):
    return torch.rand(V, generator=generator(seed), dtype=torch.float64) + 0.25


def _fy_cases():
    return {
        "fy:alpha1.5-labels-T2": fy_case("alpha", {"alpha": 1.5, "temperature": 2.0}, 300),
        "fy:alpha1.5-probs-sum": fy_case("alpha", {"alpha": 1.5}, 301, target="probs", reduction="sum"),
        "fy:kl-labels-none": fy_case("kl", {}, 302, reduction="none"),
        "fy:reverse_kl-probs": fy_case("reverse_kl", {"temperature": 0.7}, 303, target="probs"),
        "fy:js-labels": fy_case("js", {}, 304),
        "fy:hellinger-probs-unit": fy_case("hellinger", {"reference": "unit"}, 305, target="probs"),
        "fy:chi2-labels-tensor-ref-inf": fy_case(
            "chi2", {}, 306, reference=_positive_reference(9), neg_inf_frac=0.1
        ),  # fmt: skip
        "fy:alpha1.5-probs-inf-none": fy_case(
            "alpha", {"alpha": 1.5}, 307, target="probs", neg_inf_frac=0.2, reduction="none"
        ),  # fmt: skip
        "fy:alpha0.7-labels-unit": fy_case("alpha", {"alpha": 0.7, "reference": "unit"}, 308),
        "fy:alpha1.5-labels-float32": fy_case("alpha", {"alpha": 1.5}, 309, dtype=torch.float32),
        # the search on PyTorch sweeps (fdiv_search.sweep_terms) rather than the fdiv_shard kernel
        "fy:alpha1.25-probs-reference": fy_case("alpha", {"alpha": 1.25, "backend": "reference"}, 310,
                                                target="probs"),  # fmt: skip
        "fy:alpha1.3-labels-float32": fy_case("alpha", {"alpha": 1.3}, 311, dtype=torch.float32),
    }


def softargmax_case(f, options, seed, dim=-1, dtype=torch.float64, neg_inf_frac=0.0):
    shape = (5, V) if dim == -1 else (V, 5)
    logits, _ = make_logits(shape, dtype, seed=seed, neg_inf_frac=neg_inf_frac)
    upstream = torch.randn(shape, generator=generator(seed + 5), dtype=torch.float64).to(dtype)
    return {"kind": "softargmax", "logits": logits, "f": f, "options": dict(options, dim=dim),
            "upstream": upstream, "shard": {"logits": dim, "upstream": dim}}  # fmt: skip


def softmax_case(f, options, seed):
    logits, _ = make_logits((5, V), torch.float64, seed=seed, neg_inf_frac=0.05)
    logits[0] = -math.inf
    weight = torch.rand(5, generator=generator(seed + 7), dtype=torch.float64) + 0.5
    return {"kind": "softmax", "logits": logits, "f": f, "options": options, "weight": weight,
            "shard": {"logits": -1}}  # fmt: skip


def fused_div_case(seed, options, teacher="head", reduction="mean", labels=True, dtype=torch.float64):
    g = generator(seed)
    hidden = torch.randn(*LEAD, 16, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, 16, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    case = {"kind": "fused_div", "hidden": hidden, "weight_": weight, "bias": bias,
            "options": dict(options, reduction=reduction),
            "weight": torch.rand(LEAD, generator=g, dtype=torch.float64) + 0.5,
            "shard": {"weight_": 0, "bias": 0}}  # fmt: skip
    if labels:
        case["labels"] = make_labels(LEAD, seed=seed, vocab=V)
    if teacher == "head":
        case["teacher_hidden"] = torch.randn(*LEAD, 8, generator=g, dtype=torch.float64).to(dtype)
        case["teacher_weight"] = torch.randn(V, 8, generator=g, dtype=torch.float64).to(dtype)
        case["teacher_bias"] = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
        case["shard"].update(teacher_weight=0, teacher_bias=0)
    else:
        case["teacher_logits"] = (torch.randn(*LEAD, V, generator=g, dtype=torch.float64) * 2).to(dtype)
        case["shard"]["teacher_logits"] = -1
    return case


def fused_fy_case(seed, f, options, target="labels", reference=None, reduction="mean"):
    g = generator(seed)
    hidden = torch.randn(*LEAD, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 16, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    if target == "labels":
        y = make_labels(LEAD, seed=seed, vocab=V)
    else:
        y = torch.softmax(torch.randn(*LEAD, V, generator=g, dtype=torch.float64) * 2, -1)
    case = {"kind": "fused_fy", "hidden": hidden, "weight_": weight, "bias": bias, "target": y, "f": f,
            "options": dict(options, reduction=reduction),
            "weight": torch.rand(LEAD, generator=g, dtype=torch.float64) + 0.5,
            "shard": {"weight_": 0, "bias": 0}}  # fmt: skip
    if target != "labels":
        case["shard"]["target"] = -1
    if reference is not None:
        case["reference"] = reference
        case["shard"]["reference"] = -1
    return case


FUSED_DIV_OPTIONS = {"divergence": "jsd", "beta": 0.3, "temperature": 1.5, "hard_loss_weight": 0.5,
                     "softcap": 30.0, "teacher_softcap": 20.0, "chunk_size": 5}  # fmt: skip


def _fused_cases():
    return {
        "fused_div:head-mean": fused_div_case(400, FUSED_DIV_OPTIONS),
        "fused_div:head-none": fused_div_case(401, FUSED_DIV_OPTIONS, reduction="none"),
        "fused_div:logits-alpha-sum": fused_div_case(
            402,
            {"divergence": "alpha", "alpha": 0.5, "chunk_size": 7},
            teacher="logits",
            reduction="sum",
            labels=False,
        ),  # fmt: skip
        "fused_fy:alpha1.5-labels": fused_fy_case(
            403, "alpha", {"alpha": 1.5, "softcap": 30.0, "chunk_size": 5}
        ),  # fmt: skip
        "fused_fy:kl-probs-ref-none": fused_fy_case(
            404,
            "kl",
            {"temperature": 1.3, "chunk_size": 4},
            target="probs",
            reference=_positive_reference(11),
            reduction="none",
        ),  # fmt: skip
    }


LARGE = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("tv", {}),
    ("alpha", {"alpha": 0.5}),
]


def _large_cases():
    cases = {}
    for i, (divergence, options) in enumerate(LARGE):
        c = div_case(divergence, options, seed=500 + i, dtype=torch.float32, shape=(6, V), reduction="none",
                     scale=5.0, offset=1e4)  # fmt: skip
        cases["large:" + case_id((divergence, options))] = c
    return cases


def _bf16_cases():
    return {
        "bf16:forward_kl": div_case("forward_kl", {"temperature": 2.0}, 600, dtype=torch.bfloat16),
        "bf16:alpha1.5": div_case("alpha", {"alpha": 1.5}, 601, dtype=torch.bfloat16, reduction="sum"),
    }


def _alpha_end_cases():
    """alpha next to 0 and 1 in float32: A - 1 as a sum of expm1 terms (1 - A formed from log-sum-exps
    was 1e-2 off here)."""
    return {
        f"div:alpha{alpha!r}-f32": div_case(
            "alpha", {"alpha": alpha}, 610 + i, dtype=torch.float32, reduction="none"
        )
        for i, alpha in enumerate((1e-6, 1 - 1e-6))
    }


def _special_cases():
    return {
        f"special:{d}": special_rows_case(d, o, 700 + i)
        for i, (d, o) in enumerate([("forward_kl", {}), ("jsd", {"beta": 0.3}), ("alpha", {"alpha": 0.5})])
    }


def _softargmax_cases():
    return {
        "softargmax:alpha1.5": softargmax_case("alpha", {"alpha": 1.5}, 800, neg_inf_frac=0.1),
        "softargmax:js-unit": softargmax_case("js", {"reference": "unit"}, 801),
        "softargmax:kl-dim0": softargmax_case("kl", {}, 802, dim=0),
        "softargmax:chi2-dim0": softargmax_case("chi2", {"reference": "unit"}, 803, dim=0),
        "softargmax:alpha1.25": softargmax_case("alpha", {"alpha": 1.25}, 806, neg_inf_frac=0.1),
        "softargmax:rkl-reference": softargmax_case("reverse_kl", {"backend": "reference"}, 807),
        "softmax:alpha1.5": softmax_case("alpha", {"alpha": 1.5}, 804),
        "softmax:kl": softmax_case("kl", {}, 805),
    }


def _backend_cases():
    """Every divergence with each fused backend named explicitly (Triton: under the interpreter on
    CPU tensors, see conftest.py), and the reference backend, plus special rows, logits ~1e4 and
    bf16 on Triton."""
    cases = {}
    triton = triton_available() and interpreter_enabled()
    backends = ("cpu", "reference") + (("triton",) if triton else ())
    for i, (divergence, options) in enumerate(DIVERGENCE_CASES):
        for backend in backends:
            if backend == "reference" and i % 3:
                continue  # (the reference also runs for every grad_teacher case above)
            p = _param_cycle(i)
            opts = dict(options, temperature=p["temperature"], backend=backend)
            if p["labels"]:
                opts["labels"] = make_labels(LEAD, seed=i, vocab=V)
            cases[f"{backend}:" + case_id((divergence, options))] = div_case(
                divergence, opts, seed=1300 + i, reduction=p["reduction"], neg_inf_frac=p["neg_inf_frac"]
            )
    if triton:
        cases["triton-special:jsd"] = special_rows_case("jsd", {"beta": 0.3, "backend": "triton"}, 1350)
        cases["triton-special:alpha"] = special_rows_case("alpha", {"alpha": 0.5, "backend": "triton"}, 1351)
        cases["large:triton-reverse_kl"] = div_case(
            "reverse_kl", {"backend": "triton"}, 1352, dtype=torch.float32, shape=(6, V), reduction="none",
            scale=5.0, offset=1e4,
        )  # fmt: skip
        cases["bf16:triton-forward_kl"] = div_case(
            "forward_kl", {"temperature": 2.0, "backend": "triton"}, 1353, dtype=torch.bfloat16
        )
    return cases


# Against an independent float64 formula (fdistill.reference on the unsharded float64 logits): fresh
# seeds, -inf entries, logits ~1e4 and a tiny temperature (logits / T ~ 2e5), labels.
INDEPENDENT = [("forward_kl", 0.0), ("reverse_kl", 0.0), ("jeffreys", 0.3), ("jsd", 0.3), ("skew_kl", 0.1),
               ("skew_reverse_kl", 0.1), ("tv", 0.0), ("alpha", 0.5), ("alpha", -1.5)]  # fmt: skip
PARAM_NAME = {"jeffreys": "beta", "jsd": "beta", "skew_kl": "skew", "skew_reverse_kl": "skew",
              "alpha": "alpha"}  # fmt: skip


def _independent_cases():
    cases = {}
    triton = triton_available() and interpreter_enabled()
    for i, (divergence, param) in enumerate(INDEPENDENT):
        for backend in ("cpu", "triton") if triton and i % 2 == 0 else ("cpu",):
            opts = {"temperature": 0.05 if i % 2 else 1.0, "backend": backend,
                    "labels": make_labels((7,), seed=1400 + i, vocab=V)}  # fmt: skip
            if divergence in PARAM_NAME:
                opts[PARAM_NAME[divergence]] = param
            c = div_case(divergence, opts, seed=1400 + 17 * i, shape=(7, V), reduction="none",
                         neg_inf_frac=0.05, offset=1e4)  # fmt: skip
            c["param"] = param
            cases[f"f64-{backend}:{divergence}-{param}"] = c
    return cases


TWO_RANK_CASES = {
    **_divergence_cases(),
    **_backend_cases(),
    **_independent_cases(),
    **_special_cases(),
    **_large_cases(),
    **_bf16_cases(),
    **_alpha_end_cases(),
    **_fy_cases(),
    **_softargmax_cases(),
    **_fused_cases(),
}

THREE_RANK_CASES = {
    "div:forward_kl-labels": div_case("forward_kl", {"labels": make_labels(LEAD, 1, vocab=V)}, 900),
    "div:jsd-teacher-grad": div_case(
        "jsd", {"beta": 0.3, "grad_teacher": True, "temperature": 1.7}, 901, reduction="sum"
    ),  # fmt: skip
    "div:alpha3-none": div_case("alpha", {"alpha": 3.0}, 902, reduction="none", neg_inf_frac=0.1),
    "fy:alpha1.5-probs": fy_case("alpha", {"alpha": 1.5}, 903, target="probs"),
    "fy:alpha1.5-labels": fy_case("alpha", {"alpha": 1.5, "temperature": 1.3}, 904),
    "softargmax:js": softargmax_case("js", {}, 905),
    "fused_div:forward_kl": fused_div_case(906, {"divergence": "forward_kl", "chunk_size": 5}),
    "div:skew_reverse_kl-cpu": div_case(
        "skew_reverse_kl", {"skew": 0.1, "backend": "cpu", "labels": make_labels(LEAD, 2, vocab=V)}, 907,
        reduction="none", neg_inf_frac=0.1,
    ),  # fmt: skip
}
if triton_available() and interpreter_enabled():
    THREE_RANK_CASES["div:alpha-triton"] = div_case(
        "alpha", {"alpha": 1.5, "backend": "triton", "temperature": 0.8}, 908, reduction="sum"
    )


# --- errors


def _error_cases():
    base = div_case("forward_kl", {}, 1000)
    few_tokens = base["student"][:, :3].clone()
    fy = fy_case("alpha", {"alpha": 1.5}, 1001)
    fy_bad_label = dict(fy, target=fy["target"].clone())
    fy_bad_label["target"][0, 1] = V  # one past the vocabulary
    probs = fy_case("alpha", {"alpha": 1.5}, 1002, target="probs")
    # every shard of the target sums to 1 on its own: 2 over the whole vocabulary
    halves = torch.cat([torch.softmax(probs["target"][..., s], -1) for s in _slices(SIZES2)], -1)
    fused = fused_div_case(1003, {"divergence": "forward_kl"})
    return {
        "vocab_size": (dict(base, options=dict(base["options"], vocab_size=V - 1)),
                       ValueError, "add up to 1271 but vocab_size is 1270"),
        "teacher_layout": (dict(base, sizes={"teacher": SIZES2[::-1]}), ValueError,
                           "teacher's vocabulary shards do not match the student's"),
        "token_count": (dict(base, per_rank={1: {"student": few_tokens[..., : SIZES2[1]],
                                                 "teacher": few_tokens[..., : SIZES2[1]]}}),
                        ValueError, "different numbers of tokens"),
        "one_rank_bad_shape": (dict(base, per_rank={1: {"teacher": base["teacher"][:, :3, : SIZES2[1]]}}),
                               ValueError, None),
        "options_differ": (dict(base, per_rank={1: {"options": dict(base["options"], temperature=2.0)}}),
                           ValueError, "different options"),
        "fy_label_range": (fy_bad_label, ValueError, "labels must be in [0, 1271)"),
        "fy_probs_sum": (dict(probs, target=halves), ValueError, "must sum to 1 over the whole vocabulary"),
        "fused_topk": (dict(fused, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
                            options=dict(fused["options"], teacher_topk=(torch.zeros(*LEAD, 2).long(),
                                                                         torch.zeros(*LEAD, 2)))),
                       ValueError, "teacher_topk cannot be combined with vocab_parallel_group"),
        "backend_unknown": (dict(base, options=dict(base["options"], backend="fused")), ValueError,
                            "backend must be one of"),
        "fy_backend_cpu": (dict(fy, options=dict(fy["options"], backend="cpu")), ValueError,
                           "cannot be combined with vocab_parallel_group"),
    }  # fmt: skip


ERROR_CASES = _error_cases()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_group(SIZES2, TWO_RANK_CASES, str(tmp_path_factory.mktemp("vp2")))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return run_group(SIZES3, THREE_RANK_CASES, str(tmp_path_factory.mktemp("vp3")))


@pytest.fixture(scope="module")
def error_ranks(tmp_path_factory):
    cases = {name: case for name, (case, _, _) in ERROR_CASES.items()}
    cases["after_errors"] = div_case("jsd", {"beta": 0.3}, 1100)  # the group still works
    return run_group(SIZES2, cases, str(tmp_path_factory.mktemp("vp_err")))


@pytest.fixture
def single_process_group(tmp_path):
    """A one-process gloo group in this process (torch.distributed is torn down afterwards)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- comparisons


def _ok(results, name, rank):
    status = results[rank][name]
    assert status[0] == "ok", f"{name} failed on rank {rank}:\n{status[-1]}"
    return status[1]


def _tolerances(dtype):
    """(atol, rtol) of values and of gradients relative to their scale, vs the float64 ground truth."""
    if dtype == torch.float64:
        return 1e-10, 1e-9
    if dtype == torch.float32:
        return 2e-5, 2e-5
    return 2e-5, torch.finfo(dtype).eps  # float32 arithmetic, gradient rounded to the low-precision dtype


def check_case(results, name, case, sizes, dtype=torch.float64):
    """Every rank's results against the unsharded float64 results (gradients: the matching slice).

    ``dtype`` is the inputs' dtype: gradients (and f-softargmax outputs) come back in it, losses in
    float32 (float64 for float64 inputs)."""
    want = _expected(case)
    atol, rtol = _tolerances(dtype)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for rank, sl in enumerate(_slices(sizes)):
        got = _ok(results, name, rank)
        assert set(got) == set(want), (sorted(got), sorted(want))
        for key, expected in want.items():
            actual = got[key]
            if expected is None:
                assert actual is None, f"{name} rank {rank}: {key} should be None"
                continue
            if key in SHARDED_RESULTS:
                dim = case["options"]["dim"] if case["kind"] == "softargmax" else SHARDED_RESULTS[key]
                expected = _narrow(expected, dim, sl)
            if key.startswith("grad") or key == "p":
                assert actual.dtype == dtype, f"{name} rank {rank} {key}: {actual.dtype}"
            else:
                assert actual.dtype == loss_dtype, f"{name} rank {rank} {key}: {actual.dtype}"
            finite = expected[torch.isfinite(expected)]
            scale = finite.abs().max().item() if finite.numel() else 1.0
            if dtype in (torch.bfloat16, torch.float16) and actual.dtype == dtype:
                expected = expected.to(dtype)  # the truth rounded to the gradient's dtype
            assert_close_verbose(actual, expected, atol * max(scale, 1e-3), rtol, f"{name} rank {rank} {key}")


# ----------------------------------------------------------------------------- tests: values, gradients


@pytest.mark.parametrize("name", [n for n in TWO_RANK_CASES if n.split(":")[0] not in ("large", "bf16")])
def test_two_ranks(two_ranks, name):
    case = TWO_RANK_CASES[name]
    dtype = case.get("student", case.get("logits", case.get("hidden"))).dtype
    check_case(two_ranks, name, case, SIZES2, dtype)


@pytest.mark.parametrize("name", list(THREE_RANK_CASES))
def test_three_uneven_ranks(three_ranks, name):
    check_case(three_ranks, name, THREE_RANK_CASES[name], SIZES3)


@pytest.mark.parametrize("name", [n for n in TWO_RANK_CASES if n.startswith("bf16:")])
def test_bfloat16(two_ranks, name):
    """bf16 logits: float32 arithmetic, gradients in bf16 within one bf16 rounding of the truth."""
    case = TWO_RANK_CASES[name]
    check_case(two_ranks, name, case, SIZES2, torch.bfloat16)
    assert _ok(two_ranks, name, 0)["loss"].dtype == torch.float32


@pytest.mark.parametrize("name", [n for n in TWO_RANK_CASES if n.startswith("large:")])
def test_large_logits_as_accurate_as_eager_float32(two_ranks, name):
    """Logits ~1e4 in float32: the sharded error vs float64 is at most 2x that of eager float32 PyTorch
    or of the unsharded loss in float32 (the same kernels; the merged sums round differently)."""
    case = TWO_RANK_CASES[name]
    want = _expected(case)
    s, t = case["student"], case["teacher"]
    param = {"jsd": 0.3, "alpha": 0.5}.get(case["divergence"], 0.5)
    s32 = s.clone().requires_grad_()
    eager = divergence_rows_reference(s32, t, case["divergence"], param)
    (eager_grad,) = torch.autograd.grad((eager * case["weight"].float()).sum(), s32)
    plain = _expected(case, torch.float32)
    eps = torch.finfo(torch.float32).eps
    for rank, sl in enumerate(_slices(SIZES2)):
        got = _ok(two_ranks, name, rank)
        for key, ours, theirs, truth in (
            ("loss", got["loss"], (eager, plain["loss"]), want["loss"]),
            ("grad", got["grad_student"], (eager_grad[..., sl], plain["grad_student"][..., sl]),
             want["grad_student"][..., sl]),
        ):  # fmt: skip
            err = (ours.double() - truth).abs().max().item()
            base = max((x.double() - truth).abs().max().item() for x in theirs)
            floor = 8 * eps * max(truth.abs().max().item(), 1e-3)
            assert err <= 2 * base + floor, f"{name} rank {rank} {key}: {err=:.3g} eager {base=:.3g}"


@pytest.mark.parametrize("name", [n for n in TWO_RANK_CASES if n.startswith("f64-")])
def test_against_independent_float64(two_ranks, name):
    """Loss rows and gradient shards against fdistill.reference's formulas in float64 on the whole
    logits (autograd for the gradient), ignored rows 0."""
    case = TWO_RANK_CASES[name]
    opts = case["options"]
    keep = opts["labels"] != -100
    s = case["student"].clone().requires_grad_()
    rows = divergence_rows_reference(
        s, case["teacher"], case["divergence"], case["param"], opts["temperature"]
    )
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    (grad,) = torch.autograd.grad((rows * case["weight"]).sum(), s)
    for rank, sl in enumerate(_slices(SIZES2)):
        got = _ok(two_ranks, name, rank)
        pairs = (("loss", got["loss"], rows.detach()), ("grad", got["grad_student"], grad[..., sl]))
        for key, actual, expected in pairs:
            scale = expected[torch.isfinite(expected)].abs().max().item()
            assert_close_verbose(actual, expected, 1e-9 * max(scale, 1e-3), 1e-8, f"{name} rank {rank} {key}")


def _row_ops(backend):
    """(forward, partial, finish, second) ops of a fused backend."""
    suffix = ""
    if backend == "triton":
        from fdistill._triton_dispatch import triton_forward_op

        triton_forward_op()  # registers the Triton ops
        suffix = "_triton"
    ns = torch.ops.fdistill
    return [getattr(ns, f"divergence_{op}{suffix}") for op in ("fwd", "partial", "finish", "second")]


FUSED_BACKENDS = ["cpu"] + (["triton"] if triton_available() and interpreter_enabled() else [])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_merged_partials_equal_one_pass(backend, dtype):
    """In one process: the partials of three slices of each row, merged and finished (and the second
    pass summed over the slices), give the unsharded forward's loss and statistics, special rows,
    logits ~1e4 and ignored rows included; opcheck of the three ops (schema, fake)."""
    fwd, partial, finish, second = _row_ops(backend)
    vocab, sizes = 700, _slices((300, 100, 300))
    for i, (divergence, param) in enumerate(INDEPENDENT):
        s, t = make_logits((7, vocab), dtype, seed=1600 + i, neg_inf_frac=0.05)
        s[0], t[0] = -math.inf, -math.inf
        s[1, 500] = math.nan
        t[2] = -math.inf
        s[3, :300], t[3, :300] = -math.inf, -math.inf
        s[4, :300] = -math.inf
        s[5], t[5] = s[5] + 1e4, t[5] - 1e4
        labels = torch.tensor([1, 2, 3, 4, -100, 6, 7])
        options = (divergence, param, 0.7, -100)
        want, want_stats = fwd(s, t, labels, *options)
        shards = [(s[:, sl].contiguous(), t[:, sl].contiguous()) for sl in sizes]
        parts = torch.stack([partial(a, b, labels, *options) for a, b in shards])
        merge = (labels, divergence, param, -100, dtype)
        loss, stats = finish(parts, None, *merge)
        sums = sum(second(a, b, labels, stats, *options) for a, b in shards)
        if resolve_divergence(divergence, param) in TWO_PASS_DIVERGENCES:  # (alpha: its sum forms)
            loss, stats = finish(parts, sums, *merge)
        else:
            assert (sums == 0).all()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_close_verbose(loss, want, tol, tol, f"{divergence} loss")
        assert_close_verbose(stats, want_stats, 1e-4, tol, f"{divergence} stats")
        if i == 3:
            opts = ("test_schema", "test_faketensor")
            torch.library.opcheck(partial, (*shards[0], labels, *options), test_utils=opts)
            torch.library.opcheck(finish, (parts, sums, *merge), test_utils=opts)
            torch.library.opcheck(second, (*shards[0], labels, stats, *options), test_utils=opts)


def test_fused_ops_run(single_process_group):
    """The default backend on CPU tensors runs the C++ vocabulary-parallel ops and the backward kernel
    (and backend="triton" their Triton twins, under the interpreter)."""
    s, t = make_logits((4, 300), torch.float32, seed=1500)
    backends = [None] + (["triton"] if triton_available() and interpreter_enabled() else [])
    for backend in backends:
        x = s.clone().requires_grad_()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss = fdistill.divergence_loss(
                x, t, "jsd", backend=backend, vocab_parallel_group=single_process_group
            )
            loss.backward()
        names = {e.name for e in prof.events()}
        suffix = "_triton" if backend == "triton" else ""
        for op in ("partial", "finish", "second", "bwd"):
            ours = sorted(n for n in names if "fdistill" in n)
            assert f"fdistill::divergence_{op}{suffix}" in names, (backend, ours)


def test_special_rows_flags(two_ranks):
    """Padding rows are 0 (loss and gradient), rows with a NaN or one side without a distribution are NaN,
    a shard that is all -inf on one rank still counts, and teacher mass where the student (on one
    shard) has none is +inf for forward KL (all checked against the unsharded loss by test_two_ranks)."""
    got = _ok(two_ranks, "special:forward_kl", 0)
    loss = got["loss"]
    assert loss[0] == 0 and bool(torch.isnan(loss[1])) and bool(torch.isnan(loss[2]))
    assert bool(torch.isfinite(loss[3])) and loss[4] == math.inf and torch.isfinite(loss[5:]).all()
    assert (got["grad_student"][0] == 0).all() and torch.isnan(got["grad_student"][1]).all()


def test_values_identical_on_every_rank(two_ranks):
    for name in ("div:jsd-beta=0.3", "fy:alpha1.5-labels-T2", "fused_div:head-mean"):
        a, b = _ok(two_ranks, name, 0)["loss"], _ok(two_ranks, name, 1)["loss"]
        assert torch.equal(a, b), name
    a, b = (_ok(two_ranks, "fused_div:head-mean", r)["grad_hidden"] for r in (0, 1))
    assert torch.equal(a, b)  # dh is all-reduced: the whole gradient on every rank


# ----------------------------------------------------------------------------- tests: errors


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_raises_on_every_rank(error_ranks, name):
    _, error_type, message = ERROR_CASES[name]
    for rank in range(2):
        status = error_ranks[rank][name]
        assert status[0] == "error", f"{name}: rank {rank} did not raise"
        assert status[1] == error_type.__name__, f"{name} rank {rank}: {status[1]}: {status[2]}"
        if message is not None:
            assert message in status[2], f"{name} rank {rank}: {status[2]!r}"


def test_one_rank_error_is_reported_on_the_others(error_ranks):
    own, other = error_ranks[1]["one_rank_bad_shape"], error_ranks[0]["one_rank_bad_shape"]
    assert "same token dimensions" in own[2]
    assert "rank(s) [1]" in other[2] and "rejected" in other[2]


def test_group_still_works_after_errors(error_ranks):
    check_case(error_ranks, "after_errors", div_case("jsd", {"beta": 0.3}, 1100), SIZES2)


# ----------------------------------------------------------------------------- tests: one process


def _single(case, group):
    return RUNNERS[case["kind"]](_as64(case), group)


@pytest.mark.parametrize(
    "case",
    [
        div_case("jsd", {"beta": 0.3, "temperature": 1.7, "labels": make_labels(LEAD, 5, vocab=V)}, 1200),
        div_case("alpha", {"alpha": -0.5, "grad_teacher": True}, 1201, reduction="none"),
        fy_case("alpha", {"alpha": 1.5}, 1202, target="probs"),
        softargmax_case("alpha", {"alpha": 1.5}, 1203),
        fused_div_case(1204, FUSED_DIV_OPTIONS),
        fused_fy_case(1205, "js", {"chunk_size": 5}),
    ],
    ids=["div-jsd", "div-alpha-teacher", "fy", "softargmax", "fused-div", "fused-fy"],
)
def test_single_process_group_equals_plain_call(single_process_group, case):
    got = _single(case, single_process_group)
    want = _single(case, None)
    for key, expected in want.items():
        if expected is None:
            assert got[key] is None
            continue
        finite = expected[torch.isfinite(expected)]
        scale = finite.abs().max().item() if finite.numel() else 1.0
        assert_close_verbose(got[key], expected, 1e-10 * max(scale, 1e-3), 1e-9, key)


def test_group_must_be_a_process_group(single_process_group):
    s, t = make_logits((2, 5), torch.float32, seed=0)
    with pytest.raises(TypeError, match="vocab_parallel_group must be a torch.distributed.ProcessGroup"):
        fdistill.divergence_loss(s, t, vocab_parallel_group="world")


def test_needs_torch_distributed():
    s, t = make_logits((2, 5), torch.float32, seed=0)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        fdistill.divergence_loss(s, t, vocab_parallel_group=object())


def test_vocab_size_needs_a_group():
    s, t = make_logits((2, 5), torch.float32, seed=0)
    with pytest.raises(ValueError, match="vocab_size is only used with vocab_parallel_group"):
        fdistill.divergence_loss(s, t, vocab_size=5)
    with pytest.raises(ValueError, match="vocab_size is only used with vocab_parallel_group"):
        fdistill.fy_loss(s, torch.tensor([0, 1]), vocab_size=5)
