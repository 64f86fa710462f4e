"""Where kept image tokens lie on the patch grid: bias and coverage."""

from __future__ import annotations

from collections.abc import Sequence

from feather_vllm.pruning.selection import grid_side

QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def mean_row(kept: Sequence[int], num_image_tokens: int) -> float:
    """Mean row of the kept tokens, 0 = top row, 1 = bottom row.

    FastV's RoPE-biased criterion pushes this towards 1 (bottom rows sit next
    to the text in raster order); uniform coverage gives 0.5."""
    side = grid_side(num_image_tokens)
    if not kept:
        return float("nan")
    return sum((i // side) / (side - 1) for i in kept) / len(kept)


def quadrant_coverage(kept: Sequence[int], num_image_tokens: int) -> dict[str, float]:
    """Fraction of each quadrant's tokens that are kept."""
    side = grid_side(num_image_tokens)
    half = side / 2
    totals = dict.fromkeys(QUADRANTS, 0)
    hits = dict.fromkeys(QUADRANTS, 0)
    kept_set = set(kept)
    for i in range(num_image_tokens):
        row, col = divmod(i, side)
        name = ("top_" if row < half else "bottom_") + ("left" if col < half else "right")
        totals[name] += 1
        hits[name] += i in kept_set
    return {q: hits[q] / totals[q] for q in QUADRANTS}
