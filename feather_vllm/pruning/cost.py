"""Predicted kept counts and the paper's cost model (FEATHER_SPEC.md).

Per decoder layer with n tokens, hidden d and MLP width m the paper counts
C(n) = 4 n d^2 + 2 n^2 d + 2 n d m FLOPs. KV cache for a prompt is
proportional to the tokens each layer keeps, summed over layers.

>>> from feather_vllm.pruning.config import PRESETS
>>> kept_per_stage_max(PRESETS["fastv"], 729)
[182]
>>> kept_per_stage_bounds(PRESETS["feather"], 729)
[(218, 299), (19, 26)]
"""

from __future__ import annotations

from collections.abc import Sequence

from feather_vllm.pruning.config import PruningConfig
from feather_vllm.pruning.selection import stage_keep_count, uniform_grid


def kept_per_stage_bounds(config: PruningConfig, num_image_tokens: int) -> list[tuple[int, int]]:
    """(min, max) image tokens kept after each stage.

    A grid stage keeps top-k union grid: k tokens when the grid lies inside
    the top-k, k + grid when they are disjoint. Later stages rank the
    survivors, so their bounds follow from the previous ones."""
    lo = hi = num_image_tokens
    out = []
    for stage in config.stages:
        k_lo, k_hi = stage_keep_count(lo, stage), stage_keep_count(hi, stage)
        if stage.grid_stride:
            grid = uniform_grid(num_image_tokens, stage.grid_stride).numel()
            # The grid tokens still present are at most min(grid, survivors).
            lo, hi = k_lo, min(hi, k_hi + min(grid, hi))
        else:
            lo, hi = k_lo, k_hi
        out.append((lo, hi))
    return out


def kept_per_stage_max(config: PruningConfig, num_image_tokens: int) -> list[int]:
    """Most image tokens each stage can keep: what a KV reservation holds."""
    return [hi for _, hi in kept_per_stage_bounds(config, num_image_tokens)]


def layer_token_counts(config: PruningConfig, num_layers: int, num_image_tokens: int,
                       num_text_tokens: int, kept: Sequence[int] | None = None) -> list[int]:
    """Tokens present in each decoder layer during the prefill. `kept` are
    actual survivors per stage; by default the upper bounds."""
    kept = list(kept) if kept is not None else kept_per_stage_max(config, num_image_tokens)
    counts = []
    for layer in range(num_layers):
        image = num_image_tokens
        for stage, k in zip(config.stages, kept):
            if stage.layer <= layer:
                image = k
        counts.append(num_text_tokens + image)
    return counts


def layer_flops(n: int, hidden: int, mlp: int) -> float:
    """The paper's FLOPs of one decoder layer over n tokens."""
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * mlp


def prefill_flops(config: PruningConfig, num_layers: int, hidden: int, mlp: int, num_image_tokens: int,
                  num_text_tokens: int, kept: Sequence[int] | None = None) -> float:
    return sum(layer_flops(n, hidden, mlp)
               for n in layer_token_counts(config, num_layers, num_image_tokens, num_text_tokens, kept))


def flops_ratio(config: PruningConfig, num_layers: int, hidden: int, mlp: int, num_image_tokens: int,
                num_text_tokens: int, kept: Sequence[int] | None = None) -> float:
    """Prefill FLOPs relative to no pruning."""
    full = prefill_flops(PruningConfig(), num_layers, hidden, mlp, num_image_tokens, num_text_tokens)
    return prefill_flops(config, num_layers, hidden, mlp, num_image_tokens, num_text_tokens, kept) / full


def kv_token_layers(config: PruningConfig, num_layers: int, num_image_tokens: int, num_text_tokens: int,
                    kept: Sequence[int] | None = None) -> int:
    """Prompt KV held, in token-layers (sum over layers of tokens kept)."""
    return sum(layer_token_counts(config, num_layers, num_image_tokens, num_text_tokens, kept))


def kv_ratio(config: PruningConfig, num_layers: int, num_image_tokens: int, num_text_tokens: int,
             kept: Sequence[int] | None = None) -> float:
    full = kv_token_layers(PruningConfig(), num_layers, num_image_tokens, num_text_tokens)
    return kv_token_layers(config, num_layers, num_image_tokens, num_text_tokens, kept) / full
