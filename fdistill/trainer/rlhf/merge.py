"""Weight merging on state dicts (name -> tensor): WARM's average, WARP's SLERP, LITI and EMA.

* ``average``: ``θ = Σ_i w_i θ_i / Σ_i w_i`` (uniform weights: WARM's ``φ = (1/M) Σ_i φ_i``).
* ``slerp``: per tensor, on the task vectors ``δ_i = θ_i − θ_init`` with ``Ω = angle(δ_1, δ_2)``:
  ``θ = θ_init + sin((1−λ)Ω)/sin Ω · δ_1 + sin(λΩ)/sin Ω · δ_2``; when ``sin Ω ≈ 0`` (parallel or
  anti-parallel task vectors) or a task vector is zero, the linear ``θ_init + (1−λ) δ_1 + λ δ_2``.
* ``liti``: ``θ_η = (1−η) θ_init + η θ_merged`` (the next WARP iteration starts from ``θ_η``).
* ``ema_update``: ``θ_a ← (1−μ) θ_a + μ θ``, in place (WARP's and J-BOND's moving anchor).

Floating tensors are combined in float32 (float64 for float64 tensors, as fdistill's losses) and the
result takes the dtype of the first input (``init`` for ``slerp`` and ``liti``). Other tensors (integer
buffers, e.g. step counters) must be equal in every input and are copied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

StateDict = Mapping[str, Tensor]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_unit_interval(name: str, value: float) -> None:
    if not 0 <= value <= 1:  # also False for NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_matching(named: Sequence[tuple[str, StateDict]]) -> None:
    """Same keys and, per key, the same shape in every state dict; equal non-floating tensors."""
    (ref_name, ref), *others = named
    for name, sd in others:
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise ValueError(f"{name} does not have the keys of {ref_name}: missing {missing}, extra {extra}")
        for key, tensor in ref.items():
            other = sd[key]
            if other.shape != tensor.shape:
                raise ValueError(
                    f"{name}[{key!r}] has shape {tuple(other.shape)} but {ref_name}[{key!r}] has "
                    f"{tuple(tensor.shape)}"
                )
            if not tensor.is_floating_point() and not torch.equal(other.to(tensor.device), tensor):
                raise ValueError(
                    f"{name}[{key!r}] differs from {ref_name}[{key!r}]: non-floating tensors "
                    f"({tensor.dtype}) cannot be merged and must be equal"
                )


def _combine(sds: Sequence[StateDict], coefficients: Sequence[float]) -> dict[str, Tensor]:
    """``Σ_i c_i sd_i`` per floating tensor, in the first state dict's dtype and device."""
    out = {}
    for key, first in sds[0].items():
        if not first.is_floating_point():
            out[key] = first.detach().clone()
            continue
        dtype = _compute_dtype(first)
        total = sum(
            c * sd[key].detach().to(first.device, dtype) for c, sd in zip(coefficients, sds, strict=True)
        )
        out[key] = total.to(first.dtype)
    return out


def average(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Weighted average ``Σ_i w_i θ_i / Σ_i w_i`` of ``state_dicts`` (uniform when ``weights`` is None)."""
    if len(state_dicts) == 0:
        raise ValueError("state_dicts is empty: nothing to average")
    if weights is None:
        weights = [1.0] * len(state_dicts)
    weights = [float(w) for w in weights]
    if len(weights) != len(state_dicts):
        raise ValueError(f"weights has {len(weights)} entries for {len(state_dicts)} state_dicts")
    if any(not w >= 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {weights}")
    total = sum(weights)
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"weights must have a positive, finite sum, got {weights}")
    _check_matching([(f"state_dicts[{i}]", sd) for i, sd in enumerate(state_dicts)])
    return _combine(state_dicts, [w / total for w in weights])


def _slerp_coefficients(d1: Tensor, d2: Tensor, lam: float, eps: float) -> tuple[float, float]:
    """``(sin((1−λ)Ω)/sin Ω, sin(λΩ)/sin Ω)``, or ``(1−λ, λ)`` when that is undefined."""
    d1, d2 = d1.flatten().double(), d2.flatten().double()  # the angle in float64
    n1, n2 = float(d1.norm()), float(d2.norm())
    if n1 > 0 and n2 > 0:
        omega = math.acos(max(-1.0, min(1.0, float(d1 @ d2) / (n1 * n2))))
        if math.sin(omega) > eps:
            return math.sin((1 - lam) * omega) / math.sin(omega), math.sin(lam * omega) / math.sin(omega)
    return 1 - lam, lam


def slerp(
    init: StateDict, a: StateDict, b: StateDict, lam: float = 0.5, eps: float = 1e-6
) -> dict[str, Tensor]:
    """Spherical interpolation of the task vectors ``a − init`` and ``b − init``, per tensor.

    ``lam = 0`` gives ``a``, ``lam = 1`` gives ``b``. Where ``sin Ω <= eps`` or a task vector is zero,
    the task vectors are interpolated linearly (the limit of the formula as Ω → 0).
    """
    _check_unit_interval("lam", lam)
    _check_matching([("init", init), ("a", a), ("b", b)])
    out = {}
    for key, base in init.items():
        if not base.is_floating_point():
            out[key] = base.detach().clone()
            continue
        dtype = _compute_dtype(base)
        theta0 = base.detach().to(dtype)
        d1 = a[key].detach().to(base.device, dtype) - theta0
        d2 = b[key].detach().to(base.device, dtype) - theta0
        c1, c2 = _slerp_coefficients(d1, d2, lam, eps)
        out[key] = (theta0 + c1 * d1 + c2 * d2).to(base.dtype)
    return out


def liti(init: StateDict, merged: StateDict, eta: float) -> dict[str, Tensor]:
    """Linear interpolation towards the initialisation: ``(1−η) θ_init + η θ_merged``."""
    _check_unit_interval("eta", eta)
    _check_matching([("init", init), ("merged", merged)])
    return _combine([init, merged], [1 - eta, eta])


@torch.no_grad()
def ema_update(anchor: nn.Module | StateDict, model: nn.Module | StateDict, mu: float) -> None:
    """``θ_a ← (1−μ) θ_a + μ θ`` in place on ``anchor``'s tensors (μ = 0 keeps the anchor, μ = 1
    copies the model)."""
    _check_unit_interval("mu", mu)
    anchor_sd = anchor.state_dict() if isinstance(anchor, nn.Module) else anchor
    model_sd = model.state_dict() if isinstance(model, nn.Module) else model
    _check_matching([("anchor", anchor_sd), ("model", model_sd)])
    for key, target in anchor_sd.items():
        if target.is_floating_point():
            dtype = _compute_dtype(target)
            new = (1 - mu) * target.to(dtype) + mu * model_sd[key].to(target.device, dtype)
            target.copy_(new)
