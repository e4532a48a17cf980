"""Offline teachers: a teacher's top-k log-probabilities stored for a dataset and read back.

- :func:`write_topk` / :class:`TopKDataset` / :func:`collate_topk`: sharded safetensors files with a
  manifest (sha256 per shard), written atomically and resumably (:mod:`.store`);
- :func:`read_vllm_logprobs` / :func:`read_axolotl_kd`: the vLLM logprob layouts of axolotl's KD
  datasets (:mod:`.vllm`);
- :func:`retemper`, :func:`tail_logprob`, :func:`with_tail`, :func:`topk_from_logits`: the
  temperature rule ``p^(T_gen / T_kd)`` renormalised over the top-k, and the (k + 1)-th tail bucket
  (:mod:`.temperature`).

The top-k go to :func:`fdistill.divergence_loss` (logits) or
:func:`fdistill.fused_linear_divergence_loss` (hidden states) as ``teacher_topk=(indices, logprobs)``;
see docs/topk.md. Writing and reading the files needs the ``trainer`` extra (safetensors, tqdm):
``pip install 'fdistill[trainer]'``; the rest needs only torch.
"""

from .store import (
    MANIFEST,
    TopK,
    TopKBatch,
    TopKDataset,
    TopKFileError,
    collate_topk,
    truncate_topk,
    write_topk,
)
from .temperature import retemper, tail_logprob, topk_from_logits, with_tail
from .vllm import TopKPositions, read_axolotl_kd, read_vllm_logprobs

__all__ = [
    "MANIFEST",
    "TopK",
    "TopKBatch",
    "TopKDataset",
    "TopKFileError",
    "TopKPositions",
    "collate_topk",
    "read_axolotl_kd",
    "read_vllm_logprobs",
    "retemper",
    "tail_logprob",
    "topk_from_logits",
    "truncate_topk",
    "with_tail",
    "write_topk",
]
