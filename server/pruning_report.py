"""The `feather` object of a response: what the engine says pruning did.

Everything here comes from the engine's `PruningReport` (kv/plan.py),
decided and measured once in the engine: the gateway predicts nothing.
"""

from __future__ import annotations

from feather_vllm.kv.plan import PruningReport
from feather_vllm.pruning.stats import mean_row, quadrant_coverage
from server.schemas import FallbackReport, FeatherReport, KVBlocksReport, StageReport


def build_report(report: PruningReport, return_kept: bool = False) -> FeatherReport:
    """The response's view of the engine's report; kept indices only when
    the request asked for them (`feather.return_kept`)."""
    n_image = report.image_tokens
    stages = [StageReport(layer=layer, kept=len(kept),
                          mean_row=mean_row(list(kept), n_image) if kept else None,
                          quadrant_coverage=quadrant_coverage(list(kept), n_image) if kept else None,
                          kept_indices=list(kept) if return_kept else None)
              for layer, kept in report.stages]
    fallback = None
    if report.fallback is not None:
        fallback = FallbackReport(reason=report.fallback.value, message=report.fallback.description)
    return FeatherReport(preset=report.preset, image_tokens=n_image, stages=stages,
                         kv_blocks=KVBlocksReport(used=report.kv_blocks_used,
                                                  unpruned=report.kv_blocks_unpruned_total,
                                                  held_per_group=list(report.kv_blocks_held)),
                         fallback=fallback)
