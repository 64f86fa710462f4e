"""The `feather` object of a response: what the engine says pruning did.

Everything here comes from the engine's `PruningReport` (kv/plan.py),
decided and measured once in the engine: the gateway predicts nothing.
"""

from __future__ import annotations

from feather_vllm.kv.plan import PruningReport
from feather_vllm.pruning.stats import mean_row, quadrant_coverage
from server.schemas import (
    FallbackReport,
    FeatherReport,
    ImageReport,
    KVBlocksReport,
    ReusedReport,
    StageReport,
    StageTotal,
)


def build_report(report: PruningReport, return_kept: bool = False) -> FeatherReport:
    """The response's view of the engine's report; kept indices only when
    the request asked for them (`feather.return_kept`)."""
    images = []
    for i, n_image in enumerate(report.image_tokens):
        stages = []
        for stage in report.stages:
            kept = list(stage.per_image[i])
            stages.append(StageReport(layer=stage.layer, kept=len(kept),
                                      mean_row=mean_row(kept, n_image) if kept else None,
                                      quadrant_coverage=quadrant_coverage(kept, n_image) if kept else None,
                                      kept_indices=kept if return_kept else None))
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
                         reused=ReusedReport(tokens=report.reused.tokens, kept_from=report.reused.kept_from)
                         if report.reused else None)
