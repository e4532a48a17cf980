"""Optional integrations with Hugging Face Transformers and TRL (``pip install fdistill[integrations]``).

Nothing here is imported by ``import fdistill``; the submodules are loaded on first use:

* :mod:`fdistill.integrations.hf` -- :func:`causal_lm_distillation_loss`, the distillation loss between two
  causal LMs from their final hidden states and LM heads (never the ``(tokens x V)`` logits).
* :mod:`fdistill.integrations.trl` -- :class:`FdistillGKDTrainer` and :class:`FdistillDistillationTrainer`,
  TRL's ``GKDTrainer`` and ``DistillationTrainer`` with their generalized JSD computed by
  :func:`fdistill.fused_linear_divergence_loss`.
* :mod:`fdistill.integrations.callbacks` -- :class:`TeacherHackingCallback`, a ``TrainerCallback`` that
  evaluates golden (to an oracle) and proxy (to the teacher) distances every N steps and feeds them to a
  :class:`fdistill.trainer.TeacherHackingMonitor`.
"""

import importlib

_EXPORTS = {
    "causal_lm_distillation_loss": "hf",
    "final_hidden_states": "hf",
    "lm_head_of": "hf",
    "LMHeadSpec": "hf",
    "FdistillGKDTrainer": "trl",
    "FdistillDistillationTrainer": "trl",
    "TeacherHackingCallback": "callbacks",
}

__all__ = sorted(_EXPORTS)

INSTALL_HINT = "pip install 'fdistill[integrations]'"


def require(module: str, feature: str):
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{feature} needs the '{module.split('.')[0]}' package, which is not installed: {INSTALL_HINT}"
        ) from exc


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
