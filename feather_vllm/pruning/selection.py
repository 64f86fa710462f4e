"""Which image tokens survive a stage: top-k by score, union a uniform grid."""

from __future__ import annotations

import math

import torch

from feather_vllm.pruning.config import Stage


class NonSquareGridError(ValueError):
    """The image tokens do not form one square patch grid."""


def grid_side(num_image_tokens: int) -> int:
    """Side of the square patch grid; refuses any other layout, which the
    method (uniform grid, raster rows) does not cover."""
    side = math.isqrt(num_image_tokens)
    if side * side != num_image_tokens or side == 0:
        raise NonSquareGridError(
            f"{num_image_tokens} image tokens are not a square patch grid; "
            "FEATHER's uniform grid and row statistics need side x side tokens")
    return side


def uniform_grid(num_image_tokens: int, stride: int) -> torch.Tensor:
    """Every `stride`-th row and column of the patch grid, raster order."""
    side = grid_side(num_image_tokens)
    return torch.arange(num_image_tokens).reshape(side, side)[::stride, ::stride].flatten()


def stage_keep_count(num_in: int, stage: Stage) -> int:
    """Top-k size of a stage for `num_in` entering image tokens (at least 1)."""
    return max(1, int(num_in * stage.keep))


def select_stage(scores: torch.Tensor, survivors: torch.Tensor, stage: Stage,
                 num_image_tokens: int) -> torch.Tensor:
    """New survivors (original image indices, ascending) of one stage.

    `scores[i]` scores `survivors[i]`; ties rank the lower index first. The
    top `int(n_in * keep)` (at least 1) by score, united with the grid
    tokens still among `survivors` when the stage has a grid.
    """
    if scores.numel() != survivors.numel():
        raise ValueError(f"{scores.numel()} scores for {survivors.numel()} surviving image tokens")
    survivors = survivors.long().cpu()
    k = stage_keep_count(survivors.numel(), stage)
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    kept = survivors[order[:k]]
    if stage.grid_stride:
        grid = uniform_grid(num_image_tokens, stage.grid_stride)
        kept = torch.cat([kept, grid[torch.isin(grid, survivors)]])
    return torch.unique(kept)  # sorted ascending
