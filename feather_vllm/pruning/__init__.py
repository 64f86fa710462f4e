"""The pruning method itself, in pure torch (no vLLM import anywhere here).

- config: stages, presets and validation (`PruningConfig`, `resolve`);
- scoring: the criterion, the last prompt token's attention to image keys;
- selection: which image tokens survive a stage (top-k union uniform grid);
- cost: predicted kept counts and the paper's FLOPs / KV cost model.

The vLLM model (feather_vllm.model) and the tests' transformers reference
both call these, so the two paths share the method but not the plumbing.
"""

from feather_vllm.pruning.config import (
    CRITERIA,
    PRESETS,
    Criterion,
    PruningConfig,
    PruningConfigError,
    Stage,
    resolve,
)
from feather_vllm.pruning.cost import (
    flops_ratio,
    kept_per_stage_bounds,
    kept_per_stage_max,
    kv_ratio,
    kv_token_layers,
    layer_flops,
    layer_token_counts,
    prefill_flops,
)
from feather_vllm.pruning.scoring import last_token_image_attention
from feather_vllm.pruning.selection import (
    NonSquareGridError,
    grid_side,
    select_stage,
    stage_keep_count,
    uniform_grid,
)

__all__ = [
    "CRITERIA", "PRESETS", "Criterion", "PruningConfig", "PruningConfigError", "Stage", "resolve",
    "last_token_image_attention",
    "NonSquareGridError", "grid_side", "select_stage", "stage_keep_count", "uniform_grid",
    "flops_ratio", "kept_per_stage_bounds", "kept_per_stage_max", "kv_ratio",
    "kv_token_layers", "layer_flops", "layer_token_counts", "prefill_flops",
]
