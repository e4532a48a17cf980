"""The f-divergence operators' shard op (``fdiv_shard``) and the tensor tau search (fdistill.fdiv_search)
that the vocabulary-parallel path runs on it.

fdiv_shard evaluates a vocabulary shard at given statistics ``[max theta, t, S0]``: mode 0 sums
q (f*)'(x - tau) and the slope term, mode 1 writes p. Checked against the unsharded kernel's own
statistics (the sums of the whole row at its t are its S0; two shards add up to it; the probabilities are
its output), against independent float64 sums of the generator as written, and the PyTorch twin
``sweep_terms`` against the kernel at the same point; then the search itself, sweeping shards in one
process, against the unsharded kernel and against mpmath-free closed forms (sparsemax).
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import SKIP_WITHOUT_TRITON, TRITON_INTERPRETER_WARNINGS, generator

import fdistill
from fdistill import fdiv_search
from fdistill.fdiv_ops import MODE_SOFTARGMAX, SHARD_PROBS, SHARD_SUMS

CASES = [("kl", 1.5), ("reverse_kl", 1.5), ("js", 1.5), ("alpha", 1.5), ("alpha", 2.0), ("alpha", 1.25),
         ("alpha", 0.7), ("alpha", 1 + 1e-6)]  # fmt: skip
IDS = ["kl", "rkl", "js", "a1.5", "a2", "a1.25", "a0.7", "a1+1e-6"]
BACKENDS = [
    "cpu",
    pytest.param("triton", marks=[SKIP_WITHOUT_TRITON, *TRITON_INTERPRETER_WARNINGS]),
]


def _shard_op(backend):
    if backend == "triton":
        from fdistill.triton import fdiv  # noqa: F401  (registers the op)

        return torch.ops.fdistill.fdiv_shard_triton
    return torch.ops.fdistill.fdiv_shard


def _fwd_op(backend):
    if backend == "triton":
        from fdistill.triton import fdiv

        return fdiv.fdiv_forward_op()
    return torch.ops.fdistill.fdiv_fwd


def _inputs(seed, rows=4, vocab=1271, dtype=torch.float64):
    g = generator(seed)
    theta = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    theta[0, ::7] = -math.inf  # masked entries
    q = (torch.rand(rows, vocab, generator=g, dtype=torch.float64) + 0.05).to(dtype)
    return theta, q


def _conj_grad64(family, alpha, v):
    """(f*)'(v) as written, in float64 (v = theta - max - tau)."""
    if family == "kl":
        return torch.exp(v)
    if family == "reverse_kl":
        return 1 / (1 - v)
    if family == "js":
        e = torch.exp(v)
        return e / (2 - e)
    return (1 + (alpha - 1) * v).clamp_min(0) ** (1 / (alpha - 1))


def _to_tau(family, alpha, t):
    """The search variable back to tau (float64; fine away from the extremes)."""
    kind = fdiv_search.search_kind(family, alpha)
    if kind == "pole":
        return t - (1.0 if family == "reverse_kl" else math.log(2))
    if kind == "log_scale":
        return -torch.expm1(t) / (alpha - 1)
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("family", "alpha"), CASES, ids=IDS)
def test_shard_sums_and_probs_match_the_unsharded_kernel(family, alpha, backend, seed):
    theta, q = _inputs(seed)
    fwd, shard = _fwd_op(backend), _shard_op(backend)
    p, stats = fwd(theta, q, None, None, family, alpha, 1.0, 1.0, -100, 100, 1e-12, MODE_SOFTARGMAX)
    # the whole row at the kernel's own t: S0 is the stored one (up to the renormalisation)
    sums = shard(theta, q, stats, family, alpha, 1.0, 1.0, SHARD_SUMS)
    torch.testing.assert_close(sums[:, 0], stats[:, 2].double(), rtol=1e-12, atol=0)
    # two uneven shards add up to it
    cut = 500
    halves = [
        shard(theta[:, a:b].contiguous(), q[:, a:b].contiguous(), stats, family, alpha, 1.0, 1.0, SHARD_SUMS)
        for a, b in ((0, cut), (cut, theta.shape[1]))
    ]
    torch.testing.assert_close(halves[0] + halves[1], sums, rtol=1e-12, atol=0)
    # the probabilities are the forward's
    probs = shard(theta, q, stats, family, alpha, 1.0, 1.0, SHARD_PROBS)
    torch.testing.assert_close(probs, p, rtol=0, atol=1e-15)
    # independent: S0 as written in float64 at the same tau
    x = theta - theta.amax(-1, keepdim=True)
    tau = _to_tau(family, alpha, stats[:, 1]).unsqueeze(-1)
    want = torch.where(x > -math.inf, q * _conj_grad64(family, alpha, x - tau), 0).sum(-1)
    torch.testing.assert_close(sums[:, 0], want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("family", "alpha"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_sweep_terms_is_the_kernels_twin(family, alpha, dtype, seed):
    """The PyTorch evaluation of a sweep point (backend='reference' of the vocabulary-parallel path) gives the
    kernel's sums and probabilities at the same statistics."""
    theta, q = _inputs(seed, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-7
    _, stats = torch.ops.fdistill.fdiv_fwd(theta, q, None, None, family, alpha, 1.0, 1.0, -100, 100, tol, 0)
    x = theta - stats[:, :1]
    d1, d2 = fdiv_search.sweep_terms(x, stats[:, 1].double(), family, alpha)
    live = x > -math.inf
    got = torch.stack([torch.where(live, q * d, 0).sum(-1, dtype=torch.float64) for d in (d1, d2)], -1)
    want = torch.ops.fdistill.fdiv_shard(theta, q, stats, family, alpha, 1.0, 1.0, SHARD_SUMS)
    cols = 1 if family == "kl" else 2  # (kl has no Newton slope: the kernels leave S1 = 0)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[:, :cols], want[:, :cols], rtol=rtol, atol=0)


def _sharded_softargmax(theta, q, family, alpha, cuts, tol, x_mean_error=0.0):
    """f_softargmax by fdiv_search over vocabulary shards swept with fdiv_shard (one process); x_mean_error
    moves Jensen's start (a start above the root must not end the search there)."""
    acc = theta.dtype
    bounds = list(zip([0, *cuts], [*cuts, theta.shape[1]], strict=True))
    m = theta.amax(-1)
    q_max = q.gather(-1, theta.argmax(-1, keepdim=True)).squeeze(-1)
    live = theta > -math.inf
    q_total = torch.where(live, q, 0).sum(-1)
    x_mean = torch.where(live, q * (theta - m.unsqueeze(-1)), 0).sum(-1) / q_total + x_mean_error
    done = torch.zeros_like(m, dtype=torch.bool)
    search = fdiv_search.TauSearch(family, alpha, q_max, q_total, x_mean, torch.finfo(acc).eps, done)
    for _ in range(100):
        stats = torch.stack([m, search.t.to(acc), torch.ones_like(m)], -1)
        sums = sum(
            torch.ops.fdistill.fdiv_shard(
                theta[:, a:b].contiguous(), q[:, a:b].contiguous(), stats, family, alpha, 1.0, 1.0, SHARD_SUMS
            )  # fmt: skip
            for a, b in bounds
        )
        search.step(sums[:, 0], sums[:, 1], tol)
        if bool(search.done.all()):
            break
    stats = torch.stack([m, search.best_t.to(acc), search.best_s0.to(acc)], -1)
    return torch.ops.fdistill.fdiv_shard(theta, q, stats, family, alpha, 1.0, 1.0, SHARD_PROBS)


@pytest.mark.parametrize(("family", "alpha"), [c for c in CASES if c[0] != "kl"], ids=IDS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_tensor_search_over_shards_matches_the_kernel(family, alpha, dtype, seed):
    """The search of fdiv_search over three uneven shards lands where the unsharded kernel does (the same
    iterates up to summation order)."""
    theta, q = _inputs(seed, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-7
    got = _sharded_softargmax(theta, q, family, alpha, [100, 900], tol)
    want = fdistill.f_softargmax(theta.double(), family, alpha=alpha, reference=q.double(), backend="cpu")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize(
    ("family", "alpha"), [("alpha", 2.0), ("alpha", 1.3), ("js", 1.5)], ids=["a2", "a1.3", "js"]
)
def test_a_jensen_start_above_the_root_restarts_from_tau_lo(family, alpha, seed):
    """Near-uniform rows make Jensen's bound tight: an x_mean rounded up puts the start above the root
    (S0 < 1 there). The bracket then restarts from tau_lo instead of collapsing onto the start (which ended
    the search at the wrong tau: 1e-4 relative in float32 through the vocabulary-parallel path)."""
    g = generator(seed)
    theta = torch.rand(3, 5000, generator=g, dtype=torch.float64) * 0.5
    q = torch.full_like(theta, 1 / 5000)
    want = fdistill.f_softargmax(theta, family, alpha=alpha, reference=q, backend="reference")
    got = _sharded_softargmax(theta, q, family, alpha, [1000, 3000], 1e-12, x_mean_error=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_tensor_search_sparsemax_closed_form(seed):
    """alpha = 2 with a unit reference: p = [theta - tau]_+, tau from the sorted-prefix formula."""
    theta, _ = _inputs(seed, rows=3, vocab=257)
    theta[0, ::7] = 0.0
    q = torch.ones_like(theta)
    got = _sharded_softargmax(theta, q, "alpha", 2.0, [50, 130], 1e-12)
    z, _ = theta.sort(-1, descending=True)
    k = torch.arange(1, theta.shape[1] + 1, dtype=theta.dtype)
    cssv = z.cumsum(-1) - 1
    support = (z - cssv / k > 0).sum(-1, keepdim=True)
    tau = cssv.gather(-1, support - 1) / support
    torch.testing.assert_close(got, (theta - tau).clamp_min(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", [SHARD_SUMS, SHARD_PROBS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_shard_opcheck(mode, dtype, seed):
    theta, q = _inputs(seed, rows=3, vocab=33)
    logits = theta.to(dtype)
    _, stats = torch.ops.fdistill.fdiv_fwd(logits, q.float(), None, None, "alpha", 1.25, 1.0, 1.0, -100, 100,
                                           1e-7, 0)  # fmt: skip
    torch.library.opcheck(torch.ops.fdistill.fdiv_shard.default,
                          (logits, q.float(), stats, "alpha", 1.25, 1.0, 1.0, mode))  # fmt: skip


def test_shard_rejects_bad_arguments(seed):
    theta, q = _inputs(seed, rows=3, vocab=33)
    _, stats = torch.ops.fdistill.fdiv_fwd(theta, q, None, None, "kl", 1.5, 1.0, 1.0, -100, 100, 1e-12, 0)
    op = torch.ops.fdistill.fdiv_shard
    with pytest.raises(ValueError, match="mode must be 0"):
        op(theta, q, stats, "kl", 1.5, 1.0, 1.0, 2)
    with pytest.raises(ValueError, match="stats must be"):
        op(theta, q, stats[:2], "kl", 1.5, 1.0, 1.0, 0)
    with pytest.raises(TypeError, match="stats must be"):
        op(theta, q, stats.float(), "kl", 1.5, 1.0, 1.0, 0)


def test_shard_rows_without_a_finite_max_give_zero(seed):
    theta, q = _inputs(seed, rows=3, vocab=33)
    stats = torch.tensor([[-math.inf, 0, 1], [math.nan, 0, 1], [math.inf, 0, 1]], dtype=torch.float64)
    op = torch.ops.fdistill.fdiv_shard
    assert (op(theta, q, stats, "js", 1.5, 1.0, 1.0, SHARD_SUMS) == 0).all()
    assert (op(theta, q, stats, "js", 1.5, 1.0, 1.0, SHARD_PROBS) == 0).all()


def test_alpha_power_kind_choice():
    """alpha = 1 + 1/n for n = 3..8 (4/3 as a double too) takes the power kind (C++ alpha_pow_n)."""
    pytest.importorskip("triton")
    from fdistill.triton.fdiv_math import F_CODES, MAX_ALPHA_POW, alpha_pow_n, resolve_f

    assert [alpha_pow_n(1 + 1 / n) for n in range(3, MAX_ALPHA_POW + 1)] == list(range(3, MAX_ALPHA_POW + 1))
    assert alpha_pow_n(4 / 3) == 3
    assert [alpha_pow_n(a) for a in (1.3, 1 + 1 / 9, 1.5, 2.0, 0.75, 1 + 1 / 3 + 1e-6)] == [0] * 6
    assert resolve_f("alpha", 1.25) == F_CODES["alpha_pow"]
    assert resolve_f("alpha", 1.3) == F_CODES["alpha"]
