"""Data-parallel training on ``torch.distributed`` for the trainer's tiny models (``torchrun``).

The scheme keeps a run the same whatever the world size:

- every rank draws the **same global data stream** (same seeds, same generators) and keeps its
  contiguous slice of each global batch (:func:`shard`), so the data state and the generators in a
  checkpoint are global and a run resumes on any world size;
- gradients are averaged over ranks after each backward (:func:`average_gradients`: one flat
  all-reduce, what DDP's reducer does, without its bucketing). With a token-mean loss on equal-size
  slices whose sequences all count the same number of tokens (the trainer's completions all have
  ``task.length`` tokens), the mean of the slice losses is the global-batch loss, so the update is the
  1-process update up to floating-point summation order;
- evaluation splits the held-out set across ranks and all-reduces count-weighted means
  (:func:`weighted_mean`);
- rank 0 alone writes checkpoints and outputs and logs; the others wait at a :func:`barrier`.

Outside ``torchrun`` (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper is a no-op on one process.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def init_from_env(backend: str | None = None) -> None:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1); idempotent, and a no-op
    for a single process. The backend defaults to ``gloo`` (the trainer's models live on the CPU)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist.init_process_group(backend or os.environ.get("FDISTILL_DIST_BACKEND", "gloo"))
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def check_divisible(size: int, what: str = "the global batch") -> None:
    """Raise the same ``ValueError`` on every rank when ``size`` does not split evenly over the ranks."""
    if size % world():
        raise ValueError(
            f"{what} ({size}) must be divisible by the world size ({world()}): each rank trains on an "
            "equal slice so that the mean of the slice losses is the global-batch loss"
        )


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice (rows) of a global batch; the size must divide by the world size."""
    check_divisible(batch.shape[0])
    n = batch.shape[0] // world()
    return batch[rank() * n : (rank() + 1) * n]


def split(rows: torch.Tensor) -> torch.Tensor:
    """This rank's part of an evaluation set (sizes may differ by one; pair with :func:`weighted_mean`)."""
    return torch.tensor_split(rows, world())[rank()]


def weighted_mean(values: dict, weight: float) -> dict:
    """``{name: float}`` averaged over ranks, each rank's values weighted by ``weight`` (its row count)."""
    if not active():
        return {k: float(v) for k, v in values.items()}
    names = sorted(values)
    t = torch.tensor([float(values[k]) * weight for k in names] + [float(weight)], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(t[i] / t[-1]) for i, k in enumerate(names)}


def average_gradients(params, *scalars: float) -> list[float]:
    """Average the ``.grad`` of ``params`` over ranks in place (one flat all-reduce) and the given
    ``scalars`` (e.g. the slice loss) in the same call; returns the averaged scalars."""
    if not active():
        return [float(s) for s in scalars]
    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1).double() for p in params] + [torch.tensor(scalars).double()])
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
    return flat[offset:].tolist()


__all__ = [
    "active",
    "average_gradients",
    "barrier",
    "check_divisible",
    "init_from_env",
    "is_main",
    "rank",
    "shard",
    "split",
    "weighted_mean",
    "world",
]
