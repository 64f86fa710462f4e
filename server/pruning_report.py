"""The `feather` object of a response: what pruning was applied and what it saved."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from feather_vllm.pruning.config import PRESETS, PruningConfig
from feather_vllm.pruning.cost import kept_per_stage_bounds, kv_blocks_for_request
from feather_vllm.pruning.schedule import decide
from server.schemas import FeatherReport, KVBlocksReport, StageReport


@dataclasses.dataclass(frozen=True)
class EngineLayout:
    """What the report needs to know about the running engine."""

    image_token_id: int
    num_layers: int
    block_size: int
    kv_boundaries: tuple[int, ...]


def image_ranges(prompt_token_ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of image placeholder tokens."""
    ranges: list[tuple[int, int]] = []
    for i, token in enumerate(prompt_token_ids):
        if token != image_token_id:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            ranges.append((i, 1))
    return ranges


def build_report(config: PruningConfig, prompt_token_ids: Sequence[int], num_generated: int,
                 layout: EngineLayout) -> FeatherReport:
    """Kept counts come from the method's bounds (FastV and PyramidDrop keep
    exactly `kept`; a grid stage keeps between `kept_min` and `kept`, and
    its KV reserves `kept`). The engine serves the same settings with the
    same prune-or-fallback rule (pruning/schedule.py)."""
    ranges = image_ranges(prompt_token_ids, layout.image_token_id)
    n_image = sum(length for _, length in ranges)
    n_text = len(prompt_token_ids) - n_image
    fallback = None
    if config.enabled and ranges:
        decision = decide(0, len(prompt_token_ids), len(prompt_token_ids), ranges)
        if not decision.prune:
            fallback = {"reason": decision.reason or "not prunable"}
    applied = config if config.enabled and ranges and fallback is None else PRESETS["none"]
    stages = [StageReport(layer=s.layer, kept=hi, kept_min=lo)
              for s, (lo, hi) in zip(applied.stages, kept_per_stage_bounds(applied, n_image))]

    def blocks(cfg: PruningConfig) -> int:
        return kv_blocks_for_request(cfg, layout.kv_boundaries, layout.num_layers, n_image, n_text,
                                     layout.block_size, num_generated)

    return FeatherReport(preset=config.name, image_tokens=n_image, stages=stages,
                         kv_blocks=KVBlocksReport(used=blocks(applied), unpruned=blocks(PRESETS["none"])),
                         fallback=fallback)
