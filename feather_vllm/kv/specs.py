"""KV-cache groups per pruning stage (vLLM internals, pinned version).

Each decoder layer's KV spec carries the stage it belongs to (the layers
from one boundary to the next). Different stages never merge, so vLLM's
hybrid KV manager gives each stage its own KV-cache groups (and block
tables) over one shared block pool. A stage's manager reserves, for a
pruned request, only the tokens the stage's first layer can keep: text +
the most image tokens the plan allows there + generated tokens.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Self

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from feather_vllm.kv.plan import PrunePlan


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagedFullAttentionSpec(FullAttentionSpec):
    """Full attention for the layers of one pruning stage."""

    feather_stage: int = 0
    feather_first_layer: int = 0  # the stage's first decoder layer
    feather_end_layer: int = 0  # one past its last
    feather_num_layers: int = 0  # decoder depth, to validate request settings
    feather_default: str | None = None  # engine-wide default preset

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        # The inherited merge compares attention fields only: stages would
        # silently merge into one group. Refuse, so that vLLM keeps them apart.
        if any(not isinstance(s, cls) or s.feather_stage != specs[0].feather_stage for s in specs):
            raise AssertionError("layers of different pruning stages never share a KV group")
        merged = FullAttentionSpec.merge(specs)
        return cls(**{f.name: getattr(merged, f.name) for f in dataclasses.fields(FullAttentionSpec)},
                   **{f: getattr(specs[0], f) for f in _STAGE_FIELDS})

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(s, StagedFullAttentionSpec) and s.feather_stage == self.feather_stage
                   for s in kv_cache_specs.values())


_STAGE_FIELDS = ("feather_stage", "feather_first_layer", "feather_end_layer", "feather_num_layers",
                 "feather_default")


class StagedFullAttentionManager(FullAttentionManager):
    """Reserves only the tokens its stage keeps for pruned requests, and
    offers for prefix reuse only their blocks before the image (compaction
    moves nothing before it).

    Per pruned request (set by the scheduler hook from the plan, kept as
    long as the request's blocks, like vLLM's own `req_to_blocks`):
    `dropped`, the image tokens its plan lets this stage's first layer drop;
    `cache_limit`, for a request whose plan compacts any layer of this stage
    (a cut at or inside it), where its first image starts: its blocks hold
    the full token sequence only before that, in every layer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropped: dict[str, int] = {}
        self.cache_limit: dict[str, int] = {}

    def track(self, request_id: str, plan: PrunePlan) -> None:
        spec = self.kv_cache_spec
        self.dropped[request_id] = plan.dropped_at(spec.feather_first_layer)
        if plan.dropped_at(spec.feather_end_layer - 1):  # its last layer drops the most
            self.cache_limit[request_id] = plan.first_offset

    def forget(self, request_id: str) -> None:
        self.dropped.pop(request_id, None)
        self.cache_limit.pop(request_id, None)

    def trim(self, request_id: str, dropped: int, num_tokens: int) -> int | None:
        """The cut dropped `dropped` image tokens from this stage (the plan
        reserved for fewer): free the blocks past what `num_tokens` (all
        scheduled so far) need now. Returns the request's new block count,
        or None when nothing was freed. Freed blocks are at the tail and were
        never written (compact slots stop before them)."""
        if request_id not in self.dropped:
            return None
        self.dropped[request_id] = dropped
        blocks = self.req_to_blocks.get(request_id)
        keep = -(-(num_tokens - dropped) // self.block_size)
        if not blocks or len(blocks) <= keep:
            return None
        surplus = blocks[keep:]
        del blocks[keep:]
        self.block_pool.free_blocks(reversed(surplus))
        return keep

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, *args, **kwargs) -> int:
        dropped = self.dropped.get(request_id, 0)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens - dropped, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model - dropped, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
        dropped = self.dropped.get(request_id, 0)
        return super().allocate_new_blocks(request_id, num_tokens - dropped, num_tokens_main_model - dropped,
                                           *args, **kwargs)

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        # From the image on, blocks compacted in any of this stage's layers
        # are not the blocks of the full token sequence that the prefix-cache
        # hashes describe (a cut inside the stage compacts its later layers
        # only): offer only the full blocks before it.
        limit = self.cache_limit.get(request.request_id)
        if limit is not None:
            num_tokens = min(num_tokens, limit)
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def pop_blocks_for_free(self, request_id: str, *args: Any, **kwargs: Any):
        self.forget(request_id)
        return super().pop_blocks_for_free(request_id, *args, **kwargs)


def register_spec() -> None:
    """Map the staged spec to its manager (idempotent)."""
    # Without this the built-in specs are never registered once ours is.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(StagedFullAttentionSpec, StagedFullAttentionManager,
                                 uniform_type_base_spec=StagedFullAttentionSpec)


def stage_attention_layers(layers: list[Any], boundaries: list[int], num_layers: int,
                           default: str | None) -> None:
    """Give each decoder layer's attention a KV spec tagged with its stage
    (every layer, stage 0 included: one plain spec would merge them all)."""
    starts = [0, *boundaries, num_layers]

    def staged(original: Any, stage: int) -> Any:
        def get_kv_cache_spec(*args: Any, **kwargs: Any) -> KVCacheSpec:
            spec = original(*args, **kwargs)
            if type(spec) is not FullAttentionSpec:
                return spec
            return StagedFullAttentionSpec(
                **{f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)},
                feather_stage=stage, feather_first_layer=starts[stage], feather_end_layer=starts[stage + 1],
                feather_num_layers=num_layers, feather_default=default)

        return get_kv_cache_spec

    for index, layer in enumerate(layers):
        attn = layer.self_attn.attn
        stage = bisect.bisect_right(boundaries, index)
        attn.get_kv_cache_spec = staged(attn.get_kv_cache_spec, stage)
