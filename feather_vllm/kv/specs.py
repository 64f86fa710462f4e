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
import functools
from typing import Any, Self

from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from feather_vllm.kv.plan import PrunePlan, in_effect
from feather_vllm.kv.reuse import CompactChain
from feather_vllm.pruning.layout import LayoutRule


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagedFullAttentionSpec(FullAttentionSpec):
    """Full attention for the layers of one pruning stage."""

    feather_stage: int = 0
    feather_first_layer: int = 0  # the stage's first decoder layer
    feather_end_layer: int = 0  # one past its last
    feather_num_layers: int = 0  # decoder depth, to validate request settings
    feather_default: str | None = None  # engine-wide default preset
    feather_layout: LayoutRule | None = None  # how the model lays out an image's tokens

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
                 "feather_default", "feather_layout")


@dataclasses.dataclass
class _Tracked:
    """One pruned request as one stage manager sees it."""

    dropped: int  # image tokens the stage's first layer need not hold
    image_end: int  # token counts from here on are shorter by `dropped` in this stage's blocks
    first_offset: int  # where its first image starts
    compacted: bool  # some layer of the stage holds compact KV (a cut at or inside it)
    chain: CompactChain | None = None  # how its blocks are hashed, once its kept set is known
    prompt_end: tuple[int, bytes, int] | None = None  # (block, entry, held tokens): its prompt's end
    added: int = 0  # image tokens added back after the first `insert_at` tokens (follow_up "add_back")
    insert_at: int = 0

    def held(self, num_tokens: int) -> int:
        """Tokens the stage's blocks hold for the first `num_tokens`."""
        if num_tokens < self.image_end:
            return num_tokens
        return num_tokens - self.dropped + (self.added if num_tokens > self.insert_at else 0)


class StagedFullAttentionManager(FullAttentionManager):
    """Reserves only the tokens its stage keeps for pruned requests, and
    caches their blocks under hashes of what they hold.

    Per pruned request (set by the scheduler hook from the plan, kept as
    long as the request's blocks, like vLLM's own `req_to_blocks`): the
    image tokens its plan lets this stage's first layer drop, and how its
    blocks are hashed. A stage whose layers hold compact KV offers nothing
    from the first image on until the cut's kept set is known (or ever, when
    a cut falls inside the stage: its layers then hold different tokens in
    one block); then every stage hashes by the decision's `CompactChain`
    (kv/reuse.py), with the block its prompt ends in reachable at that end,
    so that the conversation's next turn finds them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracked: dict[str, _Tracked] = {}

    def track(self, request_id: str, plan: PrunePlan, chain: CompactChain | None = None) -> None:
        spec = self.kv_cache_spec
        image_end = max(image.offset + image.length for image in plan.images)
        self.tracked[request_id] = _Tracked(
            dropped=plan.dropped_at(spec.feather_first_layer), image_end=image_end,
            first_offset=plan.first_offset,
            # Whether a cut takes effect by its last layer, not whether the
            # reservation counts on drops there: a stage's bound may be the
            # whole image (a wide grid, or keep_both's union) and its cut
            # still drop tokens.
            compacted=in_effect(plan.config.cut_layers, spec.feather_end_layer - 1) is not None,
            chain=chain,
            # Added-back tokens enter the layers from the first cut on.
            added=sum(plan.add) if in_effect(plan.config.cut_layers, spec.feather_first_layer) is not None else 0,
            insert_at=plan.insert_at)

    def follow(self, request_id: str, chain: CompactChain) -> None:
        """The request's kept set is known: its blocks are hashed by `chain`."""
        tracked = self.tracked.get(request_id)
        if tracked is not None:
            tracked.chain = chain

    def forget(self, request_id: str) -> None:
        self.tracked.pop(request_id, None)

    def trim(self, request_id: str, dropped: int, num_tokens: int) -> int | None:
        """The cut dropped `dropped` image tokens from this stage (the plan
        reserved for fewer): free the blocks past what `num_tokens` (all
        scheduled so far) need now. Returns the request's new block count,
        or None when nothing was freed. Freed blocks are at the tail and were
        never written (compact slots stop before them)."""
        tracked = self.tracked.get(request_id)
        if tracked is None:
            return None
        tracked.dropped = dropped
        blocks = self.req_to_blocks.get(request_id)
        keep = -(-tracked.held(num_tokens) // self.block_size)
        if not blocks or len(blocks) <= keep:
            return None
        surplus = blocks[keep:]
        del blocks[keep:]
        self.block_pool.free_blocks(reversed(surplus))
        return keep

    def _held(self, request_id: str, num_tokens: int) -> int:
        tracked = self.tracked.get(request_id)
        return tracked.held(num_tokens) if tracked is not None else num_tokens

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, *args, **kwargs) -> int:
        held = functools.partial(self._held, request_id)
        return super().get_num_blocks_to_allocate(
            request_id, held(num_tokens), new_computed_blocks, held(total_computed_tokens),
            held(num_local_computed_tokens), held(num_tokens_main_model), *args, **kwargs)

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens, *args, **kwargs) -> None:
        # A follow-up turn's hit: vLLM's partial-hit copy-on-write applies to
        # where the hit ends in this stage's own blocks.
        super().add_local_computed_blocks(request_id, new_computed_blocks,
                                          self._held(request_id, num_local_computed_tokens),
                                          num_external_computed_tokens, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
        held = functools.partial(self._held, request_id)
        return super().allocate_new_blocks(request_id, held(num_tokens), held(num_tokens_main_model),
                                           *args, **kwargs)

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        tracked = self.tracked.get(request.request_id)
        if tracked is None:
            return super().cache_blocks(request, num_tokens, *args, **kwargs)
        if tracked.chain is None:
            # From the image on, compacted blocks are not the blocks of the
            # full token sequence that vLLM's hashes describe: only the full
            # blocks before it are offered.
            limit = tracked.first_offset if tracked.compacted else num_tokens
            return super().cache_blocks(request, min(num_tokens, limit), *args, **kwargs)
        if tracked.compacted:
            self._cache_compact(request, tracked.chain, tracked.held(num_tokens))
        else:
            super().cache_blocks(request, num_tokens, *args, **kwargs)
        self.cache_prompt_end(request)
        return None

    def _cache_compact(self, request: Any, chain: CompactChain, held: int) -> None:
        rid = request.request_id
        cached = self.num_cached_block.get(rid, 0)
        if cached >= held // self.block_size:
            return
        hashes = chain.block_hashes(request, held // self.block_size)
        self.block_pool.cache_full_blocks(
            request=_Hashed(request, hashes), blocks=self.req_to_blocks[rid], num_cached_blocks=cached,
            num_full_blocks=len(hashes), block_size=self.block_size, kv_cache_group_id=self.kv_cache_group_id)
        self.num_cached_block[rid] = len(hashes)

    def cache_computed(self, request: Any) -> None:
        """Offer what the request computed, before its blocks are freed: a
        request that ends in the step that cut (one output token) had no
        later step to cache its compacted blocks and its prompt's end."""
        tracked = self.tracked.get(request.request_id)
        if tracked is None or tracked.chain is None:
            return
        if tracked.compacted:
            self._cache_compact(request, tracked.chain, tracked.held(request.num_computed_tokens))
        self.cache_prompt_end(request)

    def cache_prompt_end(self, request: Any) -> None:
        """Once its prompt is computed, make the block it ends inside
        reachable at that end (a later turn of the conversation begins with
        this prompt). Again after the block fills: vLLM's full hash then
        replaces every entry of the block."""
        tracked = self.tracked.get(request.request_id)
        if tracked is None or tracked.chain is None:
            return
        blocks = self.req_to_blocks.get(request.request_id, [])
        if tracked.prompt_end is None:
            held = tracked.held(request.num_prompt_tokens)
            if request.num_computed_tokens < request.num_prompt_tokens or not held % self.block_size or \
                    held // self.block_size >= len(blocks):
                return
            entry = make_block_hash_with_group_id(tracked.chain.partial_hash(request, held), self.kv_cache_group_id)
            tracked.prompt_end = (held // self.block_size, entry, held)
        index, entry, held = tracked.prompt_end
        self.block_pool._insert_block_hash(entry, blocks[index], num_tokens=held)  # a no-op when present

    def pop_blocks_for_free(self, request_id: str, *args: Any, **kwargs: Any):
        self.forget(request_id)
        return super().pop_blocks_for_free(request_id, *args, **kwargs)


class _Hashed:
    """A request seen with another list of block hashes (vLLM's block pool
    reads `block_hashes` from the request it caches blocks for)."""

    def __init__(self, request: Any, block_hashes: list[bytes]) -> None:
        self._request, self.block_hashes = request, block_hashes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def register_spec() -> None:
    """Map the staged spec to its manager (idempotent)."""
    # Without this the built-in specs are never registered once ours is.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(StagedFullAttentionSpec, StagedFullAttentionManager,
                                 uniform_type_base_spec=StagedFullAttentionSpec)


def stage_attention_layers(layers: list[Any], boundaries: list[int], num_layers: int,
                           default: str | None, layout: LayoutRule) -> None:
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
                feather_num_layers=num_layers, feather_default=default, feather_layout=layout)

        return get_kv_cache_spec

    for index, layer in enumerate(layers):
        attn = layer.self_attn.attn
        stage = bisect.bisect_right(boundaries, index)
        attn.get_kv_cache_spec = staged(attn.get_kv_cache_spec, stage)
