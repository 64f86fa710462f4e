"""Predicted kept counts and the paper's cost model."""

from __future__ import annotations

from feather_vllm.pruning.config import PruningConfig
from feather_vllm.pruning.selection import stage_keep_count, uniform_grid


def kept_per_stage_bounds(config: PruningConfig, num_image_tokens: int) -> list[tuple[int, int]]:
    """(min, max) image tokens kept after each stage. A grid stage keeps
    top-k union grid: between k (grid inside the top-k) and k + grid."""
    lo = hi = num_image_tokens
    out = []
    for stage in config.stages:
        k_lo, k_hi = stage_keep_count(lo, stage), stage_keep_count(hi, stage)
        if stage.grid_stride:
            grid = uniform_grid(num_image_tokens, stage.grid_stride).numel()
            lo, hi = max(k_lo, min(grid, lo)) if lo == num_image_tokens else k_lo, min(hi, k_hi + grid)
        else:
            lo, hi = k_lo, k_hi
        out.append((lo, hi))
    return out


def kept_per_stage_max(config: PruningConfig, num_image_tokens: int) -> list[int]:
    """Most image tokens each stage can keep: what a KV reservation holds."""
    return [hi for _, hi in kept_per_stage_bounds(config, num_image_tokens)]
