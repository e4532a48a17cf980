"""The tile shapes of the Triton row kernels (one program per row, walking the vocabulary in tiles).

Chosen from the sm_90 register counts that ``python -m benchmarks.aot_sm90`` prints. A 4096-entry
tile on 16 warps (8 entries per thread and tensor) keeps every divergence kernel within the 64
registers ptxas allows at 512 threads, with no spills, so several programs share an SM and one's
loads overlap another's math. The f-divergence kernels (the solver's float64 scalars, the FY terms)
need up to ~100 registers: 8 warps on the same tile. Two size classes only, so that every variant
can be compiled ahead of time.
"""

from __future__ import annotations

import torch

DIVERGENCE_TILE = (4096, 16)  # (BLOCK, num_warps)
FDIV_TILE = (4096, 8)
FLOAT64_TILE = (1024, 4)  # float64 rows: twice the registers per entry (8 warps spill in TV)
SMALL_TILE = (512, 4)  # rows of at most SMALL_VOCAB entries: one or two masked tiles
SMALL_FLOAT64_TILE = (512, 2)
SMALL_VOCAB = 1024
# float64 TV (labels or not) spills 8-16 B at every wider tile ptxas was tried with: one warp
FLOAT64_TILE_OF = {"tv": (256, 1)}


def tiling(
    vocab: int, dtype: torch.dtype, wide: tuple[int, int] = DIVERGENCE_TILE, kind: str | None = None
) -> tuple[int, int]:
    """(BLOCK, num_warps) of a launch over rows of ``vocab`` entries of ``dtype``; ``wide`` is the
    kernel family's tile for long rows (:data:`DIVERGENCE_TILE` or :data:`FDIV_TILE`), ``kind`` the
    divergence (a few have float64 tiles of their own)."""
    small = vocab <= SMALL_VOCAB
    if dtype == torch.float64:
        return FLOAT64_TILE_OF.get(kind) or (SMALL_FLOAT64_TILE if small else FLOAT64_TILE)
    return SMALL_TILE if small else wide


def tile_classes() -> list[int]:
    """One vocabulary size per tiling class (for ahead-of-time compiles of every variant)."""
    return [SMALL_VOCAB, SMALL_VOCAB + 1]
