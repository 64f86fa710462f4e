"""The `feather` object of a response: what the engine says pruning did.

Everything here comes from the engine's `PruningReport` (kv/plan.py),
decided and measured once in the engine: the gateway predicts nothing.
"""

from __future__ import annotations

import dataclasses

import math

from feather_vllm.kv.plan import PruningReport
from feather_vllm.pruning.layout import (
    NEWLINE,
    QUADRANTS,
    ImageLayout,
    region_kept_counts,
    region_kept_indices,
    region_stats,
)
from server.schemas import (
    FallbackReport,
    FeatherReport,
    ImageReport,
    KVBlocksReport,
    RegionReport,
    ReusedReport,
    StageReport,
    StageTotal,
    UnitedReport,
)

def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _stage_report(layer: int, kept: list[int], layout: ImageLayout, return_kept: bool) -> StageReport:
    indices = kept if return_kept else None
    stats = region_stats(kept, layout)
    if layout.is_square:  # one raster: its statistics on the image itself
        (image,) = stats.values()
        return StageReport(layer=layer, kept=len(kept), mean_row=_finite(image["mean_row"]),
                           quadrant_coverage={q: _finite(image[q]) for q in QUADRANTS} if kept else None,
                           kept_indices=indices)
    maps = region_kept_indices(kept, layout) if return_kept else {}
    regions = [RegionReport(name=r.name, rows=r.rows, cols=r.cols, kept=int(stats[r.name]["kept"]),
                            mean_row=_finite(stats[r.name]["mean_row"]),
                            quadrant_coverage={q: _finite(stats[r.name][q]) for q in QUADRANTS},
                            kept_indices=maps.get(r.name)) for r in layout.regions]
    return StageReport(layer=layer, kept=len(kept), kept_indices=indices, regions=regions,
                       newlines_kept=region_kept_counts(kept, layout)[NEWLINE])


def build_report(report: PruningReport, return_kept: bool = False) -> FeatherReport:
    """The response's view of the engine's report; kept indices only when
    the request asked for them (`feather.return_kept`)."""
    images = []
    for i, n_image in enumerate(report.image_tokens):
        stages = [_stage_report(stage.layer, list(stage.per_image[i]), report.layouts[i], return_kept)
                  for stage in report.stages]
        images.append(ImageReport(image_tokens=n_image, stages=stages))
    fallback = None
    if report.fallback is not None:
        fallback = FallbackReport(reason=report.fallback.value, message=report.fallback.description)
    return FeatherReport(preset=report.preset, image_tokens=report.image_tokens_total,
                         stages=[StageTotal(layer=s.layer, kept=s.total) for s in report.stages],
                         images=images,
                         kv_blocks=KVBlocksReport(used=report.kv_blocks_used,
                                                  unpruned=report.kv_blocks_unpruned_total,
                                                  held_per_group=list(report.kv_blocks_held)),
                         fallback=fallback,
                         reused=ReusedReport(**dataclasses.asdict(report.reused)) if report.reused else None,
                         united=UnitedReport(kept_from=report.united.kept_from) if report.united else None)
