"""The `feather` object of a response: what pruning was applied and what it saved."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from feather_vllm.pruning.config import PRESETS, PruningConfig
from feather_vllm.pruning.cost import kept_per_stage_bounds, kv_blocks_for_request
from feather_vllm.pruning.schedule import decide
from feather_vllm.pruning.stats import mean_row, quadrant_coverage
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
                 layout: EngineLayout, engine_record: dict[str, Any] | None = None,
                 return_kept: bool = False) -> FeatherReport:
    """What pruning did to one request.

    `engine_record` is what the model recorded (RequestOutput's
    kv_transfer_params["feather"], present when the engine runs the model
    in its own process): exact kept tokens and the engine's own fallback
    decision. Without it, kept counts are the method's bounds (FastV and
    PyramidDrop keep exactly that many; a grid stage keeps between kept_min
    and kept_max) and the fallback is predicted with the engine's own rule
    (pruning/schedule.py)."""
    ranges = image_ranges(prompt_token_ids, layout.image_token_id)
    n_image = sum(length for _, length in ranges)
    n_text = len(prompt_token_ids) - n_image
    fallback = None
    if engine_record is not None and engine_record.get("fallback"):
        fallback = {"reason": engine_record["fallback"]}
    elif config.enabled and ranges:
        decision = decide(0, len(prompt_token_ids), len(prompt_token_ids), ranges)
        if not decision.prune:
            fallback = {"reason": decision.reason or "not prunable"}
    applied = config if config.enabled and ranges and fallback is None else PRESETS["none"]
    measured = {s["layer"]: s["kept"] for s in engine_record["stages"]} if engine_record else {}
    exact = bool(engine_record) or not applied.enabled
    stages = []
    for stage, (lo, hi) in zip(applied.stages, kept_per_stage_bounds(applied, n_image)):
        kept = measured.get(stage.layer)
        stages.append(StageReport(
            layer=stage.layer, kept=len(kept) if kept is not None else hi, kept_min=lo, kept_max=hi,
            mean_row=mean_row(kept, n_image) if kept else None,
            quadrant_coverage=quadrant_coverage(kept, n_image) if kept else None,
            kept_indices=[int(i) for i in kept] if kept is not None and return_kept else None))

    def blocks(cfg: PruningConfig) -> int:
        return kv_blocks_for_request(cfg, layout.kv_boundaries, layout.num_layers, n_image, n_text,
                                     layout.block_size, num_generated)

    return FeatherReport(preset=config.name, image_tokens=n_image, exact=exact, stages=stages,
                         kv_blocks=KVBlocksReport(used=blocks(applied), unpruned=blocks(PRESETS["none"])),
                         fallback=fallback)
