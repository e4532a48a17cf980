"""Drop-in replacements for the distillation losses of Liger-Kernel, TRL and torchtune.

Each entry point takes the peer's arguments, in the peer's order and with the peer's defaults, and gives
the peer's values and gradients, computed by fdistill's fused kernels where the peer's semantics allow
(see each module, and docs/compat.md for the conventions that differ between the peers and fdistill):

* :mod:`fdistill.compat.liger`: ``LigerJSD``, ``LigerKLDIVLoss``, ``LigerTVDLoss``, ``LigerFusedLinearJSD``,
  ``LigerFusedLinearJSDLoss`` and the functional ``liger_*`` forms;
* :mod:`fdistill.compat.trl`: ``generalized_jsd_loss`` (``GKDTrainer.generalized_jsd_loss``);
* :mod:`fdistill.compat.torchtune`: ``ForwardKLLoss``, ``ReverseKLLoss``, ``SymmetricKLLoss`` and their
  ``...WithChunkedOutputLoss`` forms.

Nothing here imports the peers.
"""

from .liger import (
    LigerFusedLinearJSD,
    LigerFusedLinearJSDLoss,
    LigerJSD,
    LigerKLDIVLoss,
    LigerTVDLoss,
    liger_fused_linear_jsd,
    liger_fused_linear_jsd_loss,
    liger_jsd,
    liger_kl_div,
    liger_tvd,
)
from .torchtune import (
    ForwardKLLoss,
    ForwardKLWithChunkedOutputLoss,
    ReverseKLLoss,
    ReverseKLWithChunkedOutputLoss,
    SymmetricKLLoss,
    SymmetricKLWithChunkedOutputLoss,
)
from .trl import generalized_jsd_loss

__all__ = [
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "LigerFusedLinearJSD",
    "LigerFusedLinearJSDLoss",
    "LigerJSD",
    "LigerKLDIVLoss",
    "LigerTVDLoss",
    "ReverseKLLoss",
    "ReverseKLWithChunkedOutputLoss",
    "SymmetricKLLoss",
    "SymmetricKLWithChunkedOutputLoss",
    "generalized_jsd_loss",
    "liger_fused_linear_jsd",
    "liger_fused_linear_jsd_loss",
    "liger_jsd",
    "liger_kl_div",
    "liger_tvd",
]
