"""KV cache groups per pruning stage (vLLM internals, pinned version).

Each decoder layer's KV spec carries the stage it belongs to: layers before
the first boundary, between boundaries, after the last. Different stages
never merge, so vLLM's hybrid KV manager gives each stage its own KV-cache
groups (and block tables) over one shared block pool. A stage's manager
reserves, for a pruned request, only the tokens the stage's first layer
keeps: text + the most image tokens the request's settings can keep there
+ generated tokens. The forward pass decides which tokens; they fit because
the reservation is the upper bound (pruning/cost.py).

The scheduler-side decision (prune or fall back) is taken in
`KVCacheManager.allocate_slots`, the one place that sees the Request, with
the same function and inputs the worker uses (pruning/schedule.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from typing import Any, Self

from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from feather_vllm.pruning import config as pcfg
from feather_vllm.pruning.cost import kept_per_stage_max
from feather_vllm.pruning.schedule import decide

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagedFullAttentionSpec(FullAttentionSpec):
    """Full attention for the layers of one pruning stage."""

    feather_stage: int = 0
    feather_first_layer: int = 0  # the stage's first decoder layer
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


_STAGE_FIELDS = ("feather_stage", "feather_first_layer", "feather_num_layers", "feather_default")


@dataclasses.dataclass(frozen=True)
class RequestKVPlan:
    """What a pruned request keeps, at most, from each cut on."""

    image_tokens: int
    kept_max: tuple[tuple[int, int], ...]  # (cut layer, max image tokens kept)

    def dropped_at(self, layer: int) -> int:
        """Image tokens surely absent from `layer`'s KV."""
        dropped = 0
        for cut, kept in self.kept_max:
            if cut <= layer:
                dropped = self.image_tokens - kept
        return dropped


# request_id -> plan (None: decided unpruned). Lives in the scheduler process.
_plans: dict[str, RequestKVPlan | None] = {}
fallbacks: dict[str, int] = {}  # reason -> requests that fell back to unpruned


def plan_for(request_id: str) -> RequestKVPlan | None:
    return _plans.get(request_id)


class StagedFullAttentionManager(FullAttentionManager):
    """Reserves only the tokens its stage keeps for pruned requests, and
    never caches compacted blocks for prefix reuse."""

    def _dropped(self, request_id: str) -> int:
        plan = _plans.get(request_id)
        return plan.dropped_at(self.kv_cache_spec.feather_first_layer) if plan else 0

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, *args, **kwargs) -> int:
        dropped = self._dropped(request_id)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens - dropped, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model - dropped, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        dropped = self._dropped(request_id)
        return super().allocate_new_blocks(request_id, num_tokens - dropped, num_tokens_main_model - dropped)

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        # Compacted blocks are not the blocks of the full token sequence that
        # the prefix-cache hashes describe: never offer them for reuse.
        if self._dropped(request.request_id):
            return
        super().cache_blocks(request, num_tokens, *args, **kwargs)


def _staged_spec(manager: KVCacheManager) -> StagedFullAttentionSpec | None:
    for group in manager.kv_cache_config.kv_cache_groups:
        if isinstance(group.kv_cache_spec, StagedFullAttentionSpec):
            return group.kv_cache_spec
    return None


def _image_ranges(request: Any) -> list[tuple[int, int]]:
    return [(f.mm_position.offset, f.mm_position.length)
            for f in (request.mm_features or []) if f.modality == "image"]


def _requested_config(spec: StagedFullAttentionSpec, request: Any) -> pcfg.PruningConfig | None:
    """The request's valid, enabled pruning settings, or None."""
    extra = request.sampling_params.extra_args if request.sampling_params else None
    value = (extra or {}).get("feather")
    try:
        cfg = pcfg.resolve(value if value is not None else spec.feather_default)
        cfg.validate(spec.feather_num_layers)
    except pcfg.PruningConfigError:
        return None  # the worker serves it unpruned too
    return cfg if cfg.enabled else None


def _plan_request(spec: StagedFullAttentionSpec, request: Any, num_new_tokens: int,
                  num_computed: int) -> bool:
    """Decide (once per started prefill) whether `request` runs pruned and
    record its KV plan. Returns True when a new decision was recorded."""
    rid = request.request_id
    ranges = _image_ranges(request)
    if not ranges or num_computed >= request.num_prompt_tokens or \
            num_computed + num_new_tokens <= min(o for o, _ in ranges):
        return False
    if rid in _plans and num_computed != 0:
        return False
    cfg = _requested_config(spec, request)
    decision = decide(num_computed, num_new_tokens, request.num_prompt_tokens, ranges)
    if cfg is None or not decision.prune:
        _plans[rid] = None
        if cfg is not None and decision.reason:
            fallbacks[decision.reason] = fallbacks.get(decision.reason, 0) + 1
        return True
    n = ranges[0][1]
    _plans[rid] = RequestKVPlan(n, tuple(zip(cfg.cut_layers, kept_per_stage_max(cfg, n))))
    return True


def _prefix_hit_cap(spec: StagedFullAttentionSpec, request: Any) -> int | None:
    """Longest prefix-cache hit a request may take and still be pruned: the
    cut must compute every image token, so only text before the image can
    come from the cache."""
    ranges = _image_ranges(request)
    if len(ranges) != 1 or _requested_config(spec, request) is None:
        return None
    return ranges[0][0]


def stage_attention_layers(layers: list[Any], boundaries: list[int], num_layers: int,
                           default: str | None) -> None:
    """Give each decoder layer's attention a KV spec tagged with its stage."""
    for index, layer in enumerate(layers):
        attn = layer.self_attn.attn
        stage = bisect.bisect_right(boundaries, index)
        first = ([0] + list(boundaries))[stage]
        original = attn.get_kv_cache_spec

        def get_kv_cache_spec(vllm_config, _original=original, _stage=stage, _first=first):
            spec = _original(vllm_config)
            if type(spec) is not FullAttentionSpec:
                return spec
            return StagedFullAttentionSpec(
                **{f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)},
                feather_stage=_stage, feather_first_layer=_first,
                feather_num_layers=num_layers, feather_default=default)

        attn.get_kv_cache_spec = get_kv_cache_spec


def install() -> None:
    """Register the staged spec/manager and hook allocation (idempotent)."""
    if getattr(KVCacheManager, "_feather_patched", False):
        return
    KVCacheManager._feather_patched = True
    # Without this the built-in specs are never registered once ours is.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(StagedFullAttentionSpec, StagedFullAttentionManager,
                                 uniform_type_base_spec=StagedFullAttentionSpec)

    original_allocate = KVCacheManager.allocate_slots

    @functools.wraps(original_allocate)
    def allocate_slots(self, request, num_new_tokens, num_new_computed_tokens=0, *args, **kwargs):
        spec = getattr(self, "_feather_spec", False)
        if spec is False:
            spec = self._feather_spec = _staged_spec(self)
        recorded = False
        if spec is not None:
            computed = request.num_computed_tokens + num_new_computed_tokens + \
                kwargs.get("num_external_computed_tokens", 0)
            recorded = _plan_request(spec, request, num_new_tokens, computed)
        blocks = original_allocate(self, request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)
        if blocks is None and recorded:
            _plans.pop(request.request_id, None)  # not scheduled: decide again next time
        return blocks

    KVCacheManager.allocate_slots = allocate_slots

    original_computed = KVCacheManager.get_computed_blocks

    @functools.wraps(original_computed)
    def get_computed_blocks(self, request):
        spec = getattr(self, "_feather_spec", False)
        if spec is False:
            spec = self._feather_spec = _staged_spec(self)
        cap = _prefix_hit_cap(spec, request) if spec is not None else None
        if cap is None:
            return original_computed(self, request)
        coordinator = self.coordinator
        find = coordinator.find_longest_cache_hit
        coordinator.find_longest_cache_hit = lambda hashes, max_len: find(hashes, min(max_len, cap))
        try:
            return original_computed(self, request)
        finally:
            del coordinator.find_longest_cache_hit  # back to the class method

    KVCacheManager.get_computed_blocks = get_computed_blocks

    original_free = KVCacheManager.free

    @functools.wraps(original_free)
    def free(self, request) -> None:
        original_free(self, request)
        _plans.pop(request.request_id, None)

    KVCacheManager.free = free
