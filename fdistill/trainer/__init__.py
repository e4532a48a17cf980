"""A thin trainer for the seed papers' setups: a small transformer LM, distillation on sequences with
fdistill's losses, checkpoints, and the teacher-hacking experiment and monitor."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distill import LOSSES, OfflineData, OnlineData, Task, distillation_loss, sequence_kl, sft_loss
from .model import LMConfig, TiltedLM, TinyLM
from .monitor import TeacherHackingMonitor, fit_power_law

__all__ = [
    "LOSSES",
    "CheckpointError",
    "LMConfig",
    "OfflineData",
    "OnlineData",
    "Task",
    "TeacherHackingMonitor",
    "TiltedLM",
    "TinyLM",
    "distillation_loss",
    "fit_power_law",
    "load_checkpoint",
    "save_checkpoint",
    "sequence_kl",
    "sft_loss",
]
