"""Offline top-k teachers (fdistill.topk, docs/topk.md): the sharded safetensors files (round trip,
resume after a kill, a flipped byte), the vLLM / axolotl KD layouts, the temperature rule and the
tail bucket, and divergence_loss with a top-k teacher, each against float64 computations written
here independently of the library."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

import fdistill
from fdistill import topk
from fdistill.trainer import extras

V, K = 23, 5


def _sequences(seed, lengths=(3, 7, 1, 4, 0, 6, 2, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, V, generator=g, dtype=torch.float64) * 2 for n in lengths]


def _pairs(sequences):
    """The teacher's (ids, logprobs) of each sequence, computed here: top-k of the float64
    log-softmax."""
    out = []
    for x in sequences:
        lp = x - x.logsumexp(-1, keepdim=True)
        top = lp.topk(K, -1)
        out.append((top.indices, top.values.float()))
    return out


class Killed(Exception):
    """Stands for the process being killed mid-write."""


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_write_read_round_trip(tmp_path, seed, ids_dtype):
    seqs = _sequences(seed)
    want = _pairs(seqs)
    manifest = topk.write_topk(tmp_path, seqs, lambda x: x, k=K, vocab_size=V, shard_tokens=8,
                               ids_dtype=ids_dtype, meta={"teacher": "random"}, progress=False)  # fmt: skip
    on_disk = json.loads((tmp_path / topk.MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["complete"] and manifest["k"] == K and manifest["vocab_size"] == V
    assert manifest["ids_dtype"] == str(ids_dtype).removeprefix("torch.")
    assert manifest["logprobs_dtype"] == "float32"
    assert manifest["meta"] == {"teacher": "random", "temperature": 1.0}
    assert manifest["num_sequences"] == len(seqs) and manifest["num_tokens"] == sum(len(x) for x in seqs)
    assert len(manifest["shards"]) > 2  # shard_tokens=8 splits the 28 tokens
    for shard in manifest["shards"]:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
    assert not list(tmp_path.glob("*.tmp"))

    ds = topk.TopKDataset(tmp_path)
    assert len(ds) == len(seqs) and ds.k == K and ds.vocab_size == V and ds.meta["teacher"] == "random"
    for i, (ids, lp) in enumerate(want):
        got = ds[i]
        assert got.indices.dtype == ids_dtype and got.logprobs.dtype == torch.float32
        assert torch.equal(got.indices.long(), ids) and torch.equal(got.logprobs, lp)
    assert torch.equal(ds[-1].logprobs, want[-1][1])
    with pytest.raises(IndexError):
        ds[len(seqs)]

    batch = ds.batch([1, 4, 2])  # lengths 7, 0, 1
    assert batch.indices.shape == batch.logprobs.shape == (3, 7, K) and batch.indices.dtype == torch.int64
    assert batch.lengths.tolist() == [7, 0, 1]
    assert batch.mask.sum(1).tolist() == [7, 0, 1]
    assert torch.equal(batch.indices[0], want[1][0]) and torch.equal(batch.logprobs[2, :1], want[2][1])
    pad = ~batch.mask  # a valid placeholder: ids 0..k-1, uniform
    assert torch.equal(batch.indices[pad], torch.arange(K).expand(int(pad.sum()), K))
    assert torch.allclose(batch.logprobs[pad], torch.tensor(-math.log(K)))
    assert batch.ignore_padding().eq(-100).sum() == pad.sum()
    assert ds.batch([2], pad_to=4).indices.shape == (1, 4, K)


def test_pair_teacher_and_temperature(tmp_path, seed):
    seqs = _sequences(seed, (4, 3))
    pairs = _pairs(seqs)
    topk.write_topk(tmp_path / "pairs", pairs, lambda p: p, k=K, vocab_size=V, progress=False)
    ds = topk.TopKDataset(tmp_path / "pairs")
    assert all(torch.equal(ds[i].logprobs, pairs[i][1]) for i in range(2))
    # logits at temperature 2: the top-k of log_softmax(z / 2)
    topk.write_topk(tmp_path / "t2", seqs, lambda x: x, k=K, vocab_size=V, temperature=2.0, progress=False)
    ds = topk.TopKDataset(tmp_path / "t2")
    assert ds.meta["temperature"] == 2.0
    want = (seqs[0] / 2).log_softmax(-1).topk(K, -1).values.float()
    torch.testing.assert_close(ds[0].logprobs, want)


def test_resume_after_kill(tmp_path, seed):
    seqs = _sequences(seed)
    calls = []

    def dying(x):
        if len(calls) == 5:  # mid-shard: sequences 2-4 are computed, not yet stored
            raise Killed
        calls.append(len(calls))
        return x

    with pytest.raises(Killed):
        topk.write_topk(tmp_path, seqs, dying, k=K, vocab_size=V, shard_tokens=8, progress=False)
    manifest = json.loads((tmp_path / topk.MANIFEST).read_text())
    assert not manifest["complete"] and manifest["num_sequences"] == 2  # one shard: 3 + 7 tokens
    stored = manifest["num_sequences"]
    with pytest.raises(topk.TopKFileError, match="did not finish.*resume"):
        topk.TopKDataset(tmp_path)
    assert len(topk.TopKDataset(tmp_path, allow_incomplete=True)) == stored
    # what a kill inside write_atomic or between a shard and its manifest entry leaves behind
    (tmp_path / "shard-00099.safetensors").write_bytes(b"half a shard")
    (tmp_path / "shard-00007.safetensors.tmp").write_bytes(b"partial")

    seen = []
    topk.write_topk(tmp_path, seqs, lambda x: seen.append(x) or x, k=K, vocab_size=V, shard_tokens=8,
                    progress=False)  # fmt: skip
    assert len(seen) == len(seqs) - stored  # the teacher ran only on the sequences not stored
    assert all(a is b for a, b in zip(seen, seqs[stored:], strict=True))
    assert not (tmp_path / "shard-00099.safetensors").exists() and not list(tmp_path.glob("*.tmp"))

    fresh = tmp_path.parent / "fresh"
    topk.write_topk(fresh, seqs, lambda x: x, k=K, vocab_size=V, shard_tokens=8, progress=False)
    resumed, one_go = (json.loads((d / topk.MANIFEST).read_text()) for d in (tmp_path, fresh))
    assert resumed == one_go  # same shards, byte for byte (their sha256)
    ds = topk.TopKDataset(tmp_path)
    for i, (ids, lp) in enumerate(_pairs(seqs)):
        assert torch.equal(ds[i].indices.long(), ids) and torch.equal(ds[i].logprobs, lp)

    # a finished write is returned as it is; other settings are refused; overwrite starts over
    assert topk.write_topk(tmp_path, seqs, dying, k=K, vocab_size=V, progress=False) == resumed
    with pytest.raises(ValueError, match="k=5.*k=4"):
        topk.write_topk(tmp_path, seqs, lambda x: x, k=4, vocab_size=V, progress=False)
    manifest = topk.write_topk(tmp_path, seqs[:2], lambda x: x, k=4, vocab_size=V, progress=False,
                               overwrite=True)  # fmt: skip
    assert manifest["num_sequences"] == 2 and len(list(tmp_path.glob("shard-*"))) == 1


def test_flipped_byte_is_detected(tmp_path, seed):
    seqs = _sequences(seed)
    topk.write_topk(tmp_path, seqs, lambda x: x, k=K, vocab_size=V, shard_tokens=8, progress=False)
    manifest = json.loads((tmp_path / topk.MANIFEST).read_text())
    victim = manifest["shards"][1]
    path = tmp_path / victim["file"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a bit of a stored log-probability
    path.write_bytes(bytes(data))

    ds = topk.TopKDataset(tmp_path)
    assert torch.equal(ds[0].logprobs, _pairs(seqs)[0][1])  # the other shards still read
    with pytest.raises(topk.TopKFileError, match=f"{victim['file']} is corrupt.*sha256.*truncate_topk"):
        ds[victim["first_sequence"]]
    with pytest.raises(topk.TopKFileError, match=victim["file"]):
        topk.TopKDataset(tmp_path).verify()
    # a damaged header is reported too, even unverified
    data = bytearray(path.read_bytes())
    data[9] = ord("#")
    path.write_bytes(bytes(data))
    with pytest.raises(topk.TopKFileError, match=f"{victim['file']} is corrupt or unreadable"):
        topk.TopKDataset(tmp_path, verify=False)[victim["first_sequence"]]

    # the recovery the message names: drop the bad shard and what follows, then write again
    topk.truncate_topk(tmp_path, 1)
    topk.write_topk(tmp_path, seqs, lambda x: x, k=K, vocab_size=V, shard_tokens=8, progress=False)
    topk.TopKDataset(tmp_path).verify()


def test_missing_extra_is_named_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(extras, "_importable", lambda m: m != "safetensors")
    out = tmp_path / "never"
    with pytest.raises(extras.MissingExtraError, match=r"safetensors .*pip install 'fdistill\[trainer\]'"):
        topk.write_topk(out, [torch.zeros(1, V)], lambda x: x, k=K, vocab_size=V)
    assert not out.exists()


def test_teacher_output_is_checked(tmp_path):
    def write(out):
        return topk.write_topk(tmp_path, [0], lambda _: out, k=2, vocab_size=4, progress=False,
                               overwrite=True)  # fmt: skip

    ids, lp = torch.tensor([[0, 1]]), torch.tensor([[-0.5, -1.0]])
    with pytest.raises(ValueError, match="sequence 0: indices must be in"):
        write((ids + 3, lp))
    with pytest.raises(ValueError, match="distinct"):
        write((torch.tensor([[1, 1]]), lp))
    with pytest.raises(ValueError, match="log-probabilities"):
        write((ids, lp.clone().fill_(float("nan"))))
    with pytest.raises(ValueError, match=r"\[T, k=2\]"):
        write((ids[:, :1], lp[:, :1]))
    with pytest.raises(ValueError, match="vocab_size=4"):
        write(torch.zeros(3, 5))


# ----------------------------------------------------------------------------- vLLM / axolotl layouts


def test_vllm_layouts():
    class Logprob:  # vLLM's own object: .logprob
        def __init__(self, logprob):
            self.logprob = logprob

    positions = [
        None,  # the first prompt token: no logprobs
        [{"token": "token_id:7", "logprob": -0.3}, {"token": "token_id:2", "logprob": -1.6},
         {"token": "token_id:9", "logprob": -2.5}],
        {4: Logprob(-3.0), 11: Logprob(-0.1), 5: Logprob(-2.4), 6: Logprob(-4.0)},  # + the sampled one
        [{"token_id": 3, "logprob": -1.0}, {"token_id": 8, "logprob": -0.7},
         {"token_id": 1, "logprob": -9.0}],
        [],
    ]  # fmt: skip
    got = topk.read_vllm_logprobs(positions, length=7)
    assert got.mask.tolist() == [False, False, False, True, True, True, False]
    assert got.indices[3:6].tolist() == [[7, 2, 9], [11, 5, 4], [8, 3, 1]]  # most likely first, k = 3
    torch.testing.assert_close(got.logprobs[3:6], torch.tensor([[-0.3, -1.6, -2.5], [-0.1, -2.4, -3.0],
                                                                 [-0.7, -1.0, -9.0]]))  # fmt: skip
    assert got.indices[0].tolist() == [0, 1, 2]  # placeholder
    # OpenAI logprobs.content entries, and axolotl's "v2" parallel token ids
    chat = [{"top_logprobs": [{"token": "token_id:5", "logprob": -0.2},
                              {"token": "token_id:1", "logprob": -2.0}]}]  # fmt: skip
    assert topk.read_vllm_logprobs(chat).indices.tolist() == [[5, 1]]
    v2 = topk.read_vllm_logprobs([[-2.0, -0.1], None], token_ids=[[4, 6], None], k=2)
    assert v2.indices.tolist()[0] == [6, 4] and v2.mask.tolist() == [True, False]
    # a top-k teacher as it is
    s = torch.randn(7, 12)
    labels = torch.where(got.mask, 0, -100)
    assert torch.isfinite(fdistill.divergence_loss(s, teacher_topk=got.teacher_topk, labels=labels))

    with pytest.raises(ValueError, match="position 0: token 'the' is not an id"):
        topk.read_vllm_logprobs([[{"token": "the", "logprob": -0.1}]])
    with pytest.raises(ValueError, match="position 1: logprob nan"):
        topk.read_vllm_logprobs([{1: -0.1}, {2: float("nan")}])
    with pytest.raises(ValueError, match="appears twice"):
        topk.read_vllm_logprobs([[{"token_id": 1, "logprob": -1}, {"token_id": 1, "logprob": -2}]])
    with pytest.raises(ValueError, match="3 logprob positions for a sequence of 2"):
        topk.read_vllm_logprobs([{1: -0.1}] * 3, length=2)
    with pytest.raises(ValueError, match="k=3 but some position has only 2"):
        topk.read_vllm_logprobs([{1: -0.1, 2: -3.0}], k=3)


def test_axolotl_kd_columns():
    inf = float("-inf")
    example = {  # what axolotl's KD strategy writes: prompt rows at -inf with ids range(k), mask 0
        "input_ids": [1, 2, 3, 4],
        "target_token_ids": [[0, 1, 2], [5, 9, 3], [7, 0, 4], [8, 6, 0]],
        "target_logprobs": [[inf, inf, inf], [-0.2, -1.9, -3.1], [-2.0, -0.05, -1e9], [-0.5, -1.2, -1e9]],
        "target_mask": [[0, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]],  # the collator pads short rows
    }
    got = topk.read_axolotl_kd(example)
    assert got.mask.tolist() == [False, True, True, True]
    assert got.indices.tolist()[1:] == [[5, 9], [0, 7], [8, 6]]  # k = 2: the smallest unmasked count
    torch.testing.assert_close(got.logprobs[1:], torch.tensor([[-0.2, -1.9], [-0.05, -2.0], [-0.5, -1.2]]))
    no_mask = topk.read_axolotl_kd({"target_logprobs": torch.tensor([[-1.0, -2, -3]] * 4),
                                    "target_token_ids": torch.tensor([[1, 2, 3]] * 4)})  # fmt: skip
    assert no_mask.mask.all() and no_mask.indices.shape == (4, 3)
    with pytest.raises(KeyError, match="target_logprobs"):
        topk.read_axolotl_kd({"target_token_ids": []})
    with pytest.raises(ValueError, match="must have one row per position"):
        topk.read_axolotl_kd({**example, "target_mask": example["target_mask"][:2]})


# ----------------------------------------------------------------------------- temperature, tail


@pytest.mark.parametrize("t_gen,t_kd", [(1.0, 2.0), (0.7, 1.0), (1.5, 0.5), (1.0, 1.0)])
def test_retemper_against_float64(seed, t_gen, t_kd):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(6, K, generator=g, dtype=torch.float64) * 3).log_softmax(-1)[:, :4]  # not normalised
    lp[0, 2] = -math.inf
    got = topk.retemper(lp.float(), t_gen, t_kd)
    # axolotl's rule, written out in float64: p / sum p, to the power T_gen / T_kd, / sum again
    p = lp.exp()
    p = p / p.sum(-1, keepdim=True)
    q = p ** (t_gen / t_kd)
    want = (q / q.sum(-1, keepdim=True)).log()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32 and got[0, 2] == -math.inf
    empty = topk.retemper(torch.full((1, 3), -math.inf), t_gen, t_kd)
    assert (empty == -math.inf).all()  # not NaN
    with pytest.raises(ValueError, match="kd_temperature must be > 0"):
        topk.retemper(lp, 1.0, 0.0)


def test_tail_bucket_against_float64(seed):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(5, 40, generator=g, dtype=torch.float64) * 2).log_softmax(-1).sort(-1, descending=True)
    lp = lp.values[:, :K]
    want = torch.log(1 - lp.exp().sum(-1, keepdim=True))
    torch.testing.assert_close(topk.tail_logprob(lp), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(topk.tail_logprob(lp.float()).double(), want, rtol=1e-5, atol=1e-6)
    # stable where the tail is tiny: 1 - sum = 1e-10 (float64 input) is kept to full relative accuracy
    tiny = torch.tensor([[math.log(0.5), math.log(0.5 - 1e-10)]], dtype=torch.float64)
    want_tiny = torch.tensor([[math.log(1e-10)]], dtype=torch.float64)
    torch.testing.assert_close(topk.tail_logprob(tiny), want_tiny, rtol=1e-5, atol=0)
    # no tail (the k entries hold all the mass, up to rounding; or a little more): -inf, not NaN
    full = torch.tensor([[-0.5, -0.5]]).exp().div(torch.tensor([[-0.5, -0.5]]).exp().sum()).log()
    assert topk.tail_logprob(full).item() == -math.inf
    assert topk.tail_logprob(torch.tensor([[-0.1, -0.2]])).item() == -math.inf
    ids, with_lp = topk.with_tail(torch.arange(K).expand(5, K), lp)
    assert ids.shape == with_lp.shape == (5, K + 1) and (ids[:, -1] == -1).all()
    torch.testing.assert_close(with_lp.exp().sum(-1), torch.ones(5, dtype=torch.float64))


# ----------------------------------------------------------------------------- divergence_loss


def _kl(p, q):  # sum p log(p / q), 0 log 0 = 0
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def _formula(divergence, p, q, beta=0.5):
    if divergence == "forward_kl":
        return _kl(p, q)
    if divergence == "reverse_kl":
        return _kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(divergence)


def _topk_case(seed, lead=(2, 3), vocab=V, k=K, mass=0.8):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, vocab, generator=g, dtype=torch.float64)
    ids = torch.rand(*lead, vocab, generator=g).argsort(-1)[..., :k]
    w = torch.rand(*lead, k, generator=g, dtype=torch.float64) + 0.1
    lp = (mass * w / w.sum(-1, keepdim=True)).log()  # top-k mass 0.8: a tail of 0.2
    return z, ids, lp


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("divergence,temperature", [("forward_kl", 1.0), ("forward_kl", 2.0), ("jsd", 0.7),
                                                    ("tv", 1.0)])  # fmt: skip
def test_divergence_loss_topk_renormalize(seed, backend, divergence, temperature):
    z, ids, lp = _topk_case(seed)
    labels = torch.tensor([[1, -100, 2], [0, 3, -100]])
    ids[0, 1] = 10_000  # garbage at ignored tokens is fine
    lp[1, 2] = float("nan")
    s = z.clone().requires_grad_()
    got = fdistill.divergence_loss(s, teacher_topk=(ids, lp), divergence=divergence, temperature=temperature,
                                   labels=labels, reduction="sum", backend=backend)  # fmt: skip
    # float64, written here: the teacher is p_i^(1/T) renormalised over its top-k, 0 elsewhere
    s64 = z.clone().requires_grad_()
    keep = labels != -100
    p_top = lp.exp().pow(1 / temperature)
    p_top = p_top / p_top.sum(-1, keepdim=True)
    p = torch.zeros_like(z).scatter(-1, ids.clamp(max=V - 1), torch.where(keep[..., None], p_top, 0))
    q = torch.softmax(s64 / temperature, -1)
    want = torch.where(keep, _formula(divergence, p, q), torch.zeros(()).double()).sum()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    (g,), (g64,) = torch.autograd.grad(got, s), torch.autograd.grad(want, s64)
    torch.testing.assert_close(g, g64, rtol=1e-9, atol=1e-12)
    assert (g[~keep] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_divergence_loss_topk_bucket(seed, backend, divergence, reduction):
    z, ids, lp = _topk_case(seed)
    s = z.clone().requires_grad_()
    got = fdistill.divergence_loss(s, teacher_topk=(ids, lp), divergence=divergence, topk_tail="bucket",
                                   reduction=reduction, backend=backend)  # fmt: skip
    # float64, written here: the (k + 1)-outcome distributions (top-k ids, everything else)
    s64 = z.clone().requires_grad_()
    q = torch.softmax(s64, -1)
    q_top = q.gather(-1, ids)
    p_top = lp.exp()
    P = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    Q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    want = _formula(divergence, P, Q)
    want = want.mean() if reduction == "mean" else want
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    weights = torch.rand_like(want)
    (g,), (g64,) = torch.autograd.grad(got, s, weights), torch.autograd.grad(want, s64, weights)
    torch.testing.assert_close(g, g64, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_divergence_loss_topk_matches_fused_linear(seed, tail):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(V, 8, generator=g)
    _, ids, lp = _topk_case(seed, lead=(6,))
    opts = dict(teacher_topk=(ids, lp.float()), topk_tail=tail, divergence="jsd", beta=0.3)
    fused = fdistill.fused_linear_divergence_loss(h, w, **opts)
    (gf,) = torch.autograd.grad(fused, h)
    logits = fdistill.divergence_loss(h @ w.T, **opts)
    (gl,) = torch.autograd.grad(logits, h)
    torch.testing.assert_close(logits, fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gl, gf, rtol=1e-4, atol=1e-6)


def test_axolotl_temperature_convention(seed):
    """A teacher stored at T_gen, distilled at T_kd as axolotl's top-k forward KL does it: the
    student at T_kd, the teacher p^(T_gen / T_kd) renormalised over its top-k."""
    t_gen, t_kd = 0.8, 2.0
    z, ids, lp = _topk_case(seed)
    s = z.clone().requires_grad_()
    got = fdistill.divergence_loss(s, teacher_topk=(ids, topk.retemper(lp, t_gen, 1.0)), temperature=t_kd)
    s64 = z.clone().requires_grad_()
    p = lp.exp() / lp.exp().sum(-1, keepdim=True)
    p = p ** (t_gen / t_kd)
    log_p = (p / p.sum(-1, keepdim=True)).log()
    log_q = torch.log_softmax(s64 / t_kd, -1).gather(-1, ids)
    want = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s64)[0])


def test_divergence_loss_module_and_float32(seed):
    z, ids, lp = _topk_case(seed)
    crit = fdistill.DivergenceLoss("forward_kl", topk_tail="bucket")
    want = fdistill.divergence_loss(z, teacher_topk=(ids, lp), topk_tail="bucket")
    torch.testing.assert_close(crit(z, teacher_topk=(ids, lp)), want)
    got32 = fdistill.divergence_loss(z.float(), teacher_topk=(ids.int(), lp.float()))
    torch.testing.assert_close(got32.double(), fdistill.divergence_loss(z, teacher_topk=(ids, lp)),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_divergence_loss_topk_errors(seed):
    z, ids, lp = _topk_case(seed)
    inf_row = lp.clone()
    inf_row[0, 1] = -math.inf
    bad = [
        (dict(teacher_topk=(ids + V, lp)), ValueError, "teacher_topk indices must be < V = 23"),
        (dict(teacher_topk=(ids - V, lp)), ValueError, "teacher_topk indices must be >= 0"),
        (dict(teacher_topk=(ids, lp.clone().fill_(float("nan")))), ValueError, "teacher_topk logprobs.*NaN"),
        (dict(teacher_topk=(ids, lp.clone().fill_(math.inf))), ValueError, r"teacher_topk logprobs.*\+inf"),
        (dict(teacher_topk=(ids, inf_row)), ValueError, "teacher_topk logprobs are all -inf"),
        (dict(teacher_topk=(ids[..., :2], lp)), ValueError, "teacher_topk indices .* must both be"),
        (dict(teacher_topk=(ids[:1], lp[:1])), ValueError, r"\(\.\.\., k\) with \.\.\. = \(2, 3\)"),
        (dict(teacher_topk=(ids.double(), lp)), TypeError, "teacher_topk indices must be an integer"),
        (dict(teacher_topk=ids), TypeError, "teacher_topk must be a pair"),
        (dict(teacher_topk=(ids.expand(2, 3, K).clone().fill_(1), lp)), ValueError, "distinct"),
        (dict(teacher_topk=(ids, lp), topk_tail="bucket", temperature=2.0), ValueError, "temperature=1"),
        (dict(teacher_topk=(ids, lp.clamp(min=-0.01)), topk_tail="bucket"), ValueError, "sum to at most 1"),
        (dict(teacher_topk=(ids, lp), topk_tail="drop"), ValueError, "topk_tail must be one of"),
        (dict(teacher_topk=(ids, lp), grad_teacher=True), ValueError, "grad_teacher"),
        (dict(teacher_topk=(ids, lp.clone().requires_grad_())), ValueError, "logprobs requires grad"),
        (dict(teacher_topk=(ids, lp), labels=torch.zeros(2, 2).long()), ValueError, "labels"),
        (dict(), TypeError, "teacher_logits must be a torch.Tensor, got None"),
    ]
    for kwargs, exc, match in bad:
        with pytest.raises(exc, match=match):
            fdistill.divergence_loss(z, **kwargs)
    with pytest.raises(ValueError, match="not both"):
        fdistill.divergence_loss(z, z, teacher_topk=(ids, lp))
