"""Liger-Kernel baselines, where Liger has the divergence; none when Liger does not import.

Liger is optional and its import can fail in many ways besides ImportError (a Triton API it expects,
a CUDA query at import time...): any exception drops only the Liger rows, with one line saying why.
The submodules are imported directly: ``liger_kernel.transformers`` may pull in Hugging Face.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

#  divergence -> Liger loss; JSD's beta is the teacher's weight as in fdistill (beta = 1: reverse KL).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv")
FUSED_LINEAR_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # LigerFusedLinearJSD's jsd_beta


@functools.cache
def load():
    """The Liger classes (a namespace), or None after printing why they are unavailable."""
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        from liger_kernel.transformers.jsd import LigerJSD
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
        from liger_kernel.transformers.tvd import LigerTVDLoss
    except Exception as err:  # any import failure: only the Liger rows go
        print(f"liger-kernel unavailable, its rows are dropped: {type(err).__name__}: {err}", flush=True)
        return None
    return SimpleNamespace(
        JSD=LigerJSD, KLDIV=LigerKLDIVLoss, TVD=LigerTVDLoss, FusedLinearJSD=LigerFusedLinearJSD
    )


def loss_on_distributions(divergence: str):
    """(loss of the student's and teacher's log-probs or probs, whether it takes probs) or None."""
    liger = load()
    if liger is None or divergence not in DIVERGENCES:
        return None
    if divergence == "forward_kl":
        kl = liger.KLDIV(reduction="batchmean", log_target=True)
        return (lambda log_q, log_p: kl(log_q, log_p)), False
    if divergence == "tv":
        tvd = liger.TVD(reduction="batchmean")
        return (lambda q, p: tvd(q, p)), True
    jsd = liger.JSD(beta=1.0 if divergence == "reverse_kl" else 0.5)
    return (lambda log_q, log_p: jsd(log_q, log_p)), False


def fused_linear(divergence: str):
    """LigerFusedLinearJSD for forward KL (beta 0), reverse KL (beta 1) and JSD (0.5), or None."""
    liger = load()
    if liger is None or divergence not in FUSED_LINEAR_BETA:
        return None
    return liger.FusedLinearJSD(jsd_beta=FUSED_LINEAR_BETA[divergence])
