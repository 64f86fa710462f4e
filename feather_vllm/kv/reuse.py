"""Reuse of a pruned image's KV across the turns of a conversation
(scheduler side, vLLM internals, pinned version: block hashes and the block
pool). The design, with what is hashed per group and when nothing is
reused: docs/multi_turn_reuse.md.

- `Decision`: one cut's outcome, with everything that decided it (the
  settings, the prompt up to its last token, the images, the cache salt,
  the LoRA adapter) folded into one digest.
- `DecisionIndex`: the decisions whose pruned KV may still be cached, per
  settings and first image; owned by the KV-cache manager, bounded.
- `CompactChain`: the block hashes of one request's KV in one KV group
  whose layers hold only the kept image tokens: vLLM's chain over the
  compacted token sequence, keyed by the decision's digest from the first
  block that holds an image token. A group before the first cut keeps
  vLLM's own hashes.
- `find_hit`: a follow-up turn's longest prefix-cache hit in every group
  under those hashes, reconciled to one length in prompt tokens; a hit
  ending inside a block is vLLM's partial hit (its blocks are copied on
  write by vLLM itself).
"""

from __future__ import annotations

import array
import collections
import dataclasses
from typing import Any, Sequence

from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import hash_block_tokens

from feather_vllm.kv.plan import ImageSpan, KeptTokens
from feather_vllm.pruning.config import PruningConfig, Stage


def image_features(request: Any) -> list[Any]:
    """The request's image features (vLLM's `MultiModalFeatureSpec`), in prompt order."""
    return [f for f in (request.mm_features or []) if f.modality == "image"]


def caller_id(request_id: str) -> str:
    """The id the caller gave a request: vLLM's engine appends "-" and 8
    random characters to it (`InputProcessor`, pinned version)."""
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 else request_id


def _packed(token_ids: Sequence[int]) -> bytes:
    return array.array("q", token_ids).tobytes()


def _lora(request: Any) -> str | None:
    lora = getattr(request, "lora_request", None)
    return lora.lora_name if lora is not None else None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one request's cut kept, and everything that decided it."""

    request_id: str  # the request that cut, as its caller named it
    stages: tuple[Stage, ...]
    prompt_len: int
    prompt: bytes  # its token ids, packed (an index holds thousands); the criterion read the last one
    images: tuple[ImageSpan, ...]
    identifiers: tuple[str, ...]  # its images' identities (vLLM's multimodal hashes)
    salt: str | None  # the prefix-cache salt (the gateway's per-key salt)
    lora: str | None
    kept: KeptTokens
    digest: bytes

    @classmethod
    def of(cls, request: Any, config: PruningConfig, images: tuple[ImageSpan, ...], kept: KeptTokens) -> "Decision":
        prompt = _packed(request.all_token_ids[:request.num_prompt_tokens])
        identifiers = tuple(f.identifier for f in image_features(request))
        salt, lora = request.cache_salt, _lora(request)
        kept_sets = tuple((s.layer, s.per_image) for s in kept.stages)
        digest = sha256(("feather-decision", config.stages, prompt, identifiers, salt, lora, kept_sets))
        return cls(caller_id(request.request_id), config.stages, request.num_prompt_tokens, prompt, images,
                   identifiers, salt, lora, kept, digest)

    @property
    def key(self) -> tuple[Any, ...]:
        return self.stages, self.identifiers[0]

    @property
    def first_offset(self) -> int:
        return self.images[0].offset

    @property
    def image_end(self) -> int:
        return max(image.offset + image.length for image in self.images)

    def precedes(self, request: Any) -> bool:
        """Whether this decision was made for a shorter prompt than
        `request`'s: an earlier turn of its conversation (one made for the
        same prompt is this turn's own: cut again, or resumed after preemption)."""
        return self.prompt_len < request.num_prompt_tokens

    def continued_by(self, request: Any, config: PruningConfig) -> bool:
        """Whether `request` continues the conversation this decision was
        made in: the same settings, images, salt and adapter, its prompt
        beginning with the decision's whole prompt, and no image after it."""
        features = image_features(request)
        return (config.stages == self.stages
                and request.num_prompt_tokens >= self.prompt_len
                and tuple(f.identifier for f in features) == self.identifiers
                and tuple((f.mm_position.offset, f.mm_position.length) for f in features)
                == tuple((image.offset, image.length) for image in self.images)
                and request.cache_salt == self.salt and _lora(request) == self.lora
                and _packed(request.all_token_ids[:self.prompt_len]) == self.prompt)


class DecisionIndex:
    """Decisions whose pruned KV may be cached, by settings and first image;
    the most recent `per_key` for each of the last `max_keys` keys. A
    decision whose blocks were evicted simply finds no hit."""

    def __init__(self, max_keys: int = 2048, per_key: int = 4) -> None:
        self._by_key: collections.OrderedDict[tuple[Any, ...], list[Decision]] = collections.OrderedDict()
        self.max_keys, self.per_key = max_keys, per_key

    def add(self, decision: Decision) -> None:
        entries = self._by_key.pop(decision.key, [])
        entries = [d for d in entries if d.digest != decision.digest][-(self.per_key - 1):] + [decision]
        self._by_key[decision.key] = entries
        while len(self._by_key) > self.max_keys:
            self._by_key.popitem(last=False)

    def candidates(self, config: PruningConfig, request: Any) -> list[Decision]:
        """Decisions `request` continues, the longest prompt first."""
        features = image_features(request)
        if not features:
            return []
        entries = self._by_key.get((config.stages, features[0].identifier), [])
        return sorted((d for d in entries if d.continued_by(request, config)), key=lambda d: -d.prompt_len)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_key.values())


@dataclasses.dataclass
class CompactChain:
    """Block hashes of one request's KV in one KV group whose layers lack
    the image tokens at `dropped` (none: a group before the first cut),
    extended as its tokens grow.

    Full blocks: vLLM's own hashes up to the block holding the first image
    token (compaction moves nothing before it) and everywhere in a group
    whose layers all hold every token; from there on vLLM's
    `hash_block_tokens` over the compacted token ids, with the decision's
    digest as extra key. A group split by a cut (its first layer holds every
    token, a later one compact KV in the same blocks: FastV's layer 3 in
    stage 0-3) is `salted`: its blocks are hashed over the full token ids,
    with the digest, which fixes what the compact layers hold in them. A
    block the prompt ends inside is also reachable by a partial entry (the
    digest and a marker as extra keys) at the prompt's end."""

    digest: bytes
    dropped: frozenset[int]
    salted: bool  # some layer of the group holds compact KV
    first_offset: int
    image_end: int
    block_size: int
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    _head: list[int] | None = None  # compacted token ids up to image_end

    @classmethod
    def of(cls, decision: Decision, first_layer: int, end_layer: int, block_size: int) -> "CompactChain":
        """The chain of the group of layers [first_layer, end_layer)."""
        dropped = decision.kept.dropped_positions(first_layer, decision.images)
        salted = bool(decision.kept.dropped_positions(end_layer - 1, decision.images))  # its last layer drops most
        return cls(decision.digest, frozenset(dropped), salted, decision.first_offset, decision.image_end, block_size)

    def held(self, num_tokens: int) -> int:
        """Tokens this group's blocks hold for the first `num_tokens` of the
        sequence (the dropped image tokens are never held)."""
        return num_tokens - len(self.dropped) if num_tokens >= self.image_end else num_tokens

    def covered(self, held: int) -> int:
        """Tokens of the sequence the first `held` tokens of this group's
        blocks stand for (exact once the kept image tokens are all held;
        less than `image_end` before that)."""
        return held + len(self.dropped) if held >= self.held(self.image_end) else min(held, self.first_offset)

    def _ids(self, request: Any, start: int, end: int) -> list[int]:
        """The compacted token ids from `start` to `end` (held positions)."""
        tokens = request.all_token_ids
        if not self.dropped:
            return list(tokens[start:end])
        if self._head is None:
            self._head = [t for p, t in enumerate(tokens[:self.image_end]) if p not in self.dropped]
        head, shift = self._head, len(self.dropped)
        return head[start:end] + list(tokens[max(start, len(head)) + shift:end + shift])

    def block_hashes(self, request: Any, num_blocks: int) -> list[bytes]:
        """Hashes of the group's first `num_blocks` full blocks for `request`
        (fewer when its tokens do not fill them)."""
        if not self.salted:
            return list(request.block_hashes[:num_blocks])
        size = self.block_size
        while len(self.hashes) < num_blocks:
            j = len(self.hashes)
            if j < self.first_offset // size:
                self.hashes.append(request.block_hashes[j])
                continue
            ids = self._ids(request, j * size, (j + 1) * size)
            if len(ids) < size:
                break
            self.hashes.append(hash_block_tokens(sha256, self.hashes[-1] if j else None, ids, (self.digest,)))
        return self.hashes[:num_blocks]

    def partial_hash(self, request: Any, held: int) -> bytes:
        """The entry of the block holding held position `held - 1`, for
        the first `held` held tokens (not a block boundary)."""
        j = held // self.block_size
        parent = self.block_hashes(request, j)[-1] if j else None
        return hash_block_tokens(sha256, parent, self._ids(request, j * self.block_size, held),
                                 (self.digest, "feather-partial"))


@dataclasses.dataclass(frozen=True)
class Hit:
    """A follow-up turn's prefix-cache hit on an earlier turn's pruned KV."""

    decision: Decision
    blocks: tuple[list[Any], ...]  # per KV group, vLLM's KVCacheBlocks to take
    tokens: int  # prompt tokens they cover (may end inside a block: vLLM copies it on write)
    chains: tuple[CompactChain, ...]  # per KV group: the request's own
    # Per image, the dropped tokens the request adds back on top (follow_up
    # "add_back"; empty: a plain reuse), decided with the lookup.
    add: tuple[int, ...] = ()


def _group_hit(manager: Any, request: Any, chain: CompactChain, limit: int) -> tuple[list[Any], int]:
    """A group's cached blocks for `request` along `chain` (full blocks,
    then a partial entry in the next block), and how many held tokens they
    hold."""
    pool, group, size = manager.block_pool, [manager.kv_cache_group_id], manager.block_size
    most = chain.held(limit)
    blocks = []
    for block_hash in chain.block_hashes(request, most // size):
        cached = pool.get_cached_block(block_hash, group)
        if not cached:
            break
        blocks.append(cached[0])
    held = len(blocks) * size
    for extra in range(min(size - 1, most - held), 0, -1):  # the longest entry first
        cached = pool.get_cached_block(chain.partial_hash(request, held + extra), group)
        if cached:
            blocks.append(cached[0])
            return blocks, held + extra
    return blocks, held


def find_hit(managers: Sequence[Any], request: Any, decision: Decision) -> Hit | None:
    """The longest hit of `request` on `decision`'s pruned KV, covering at
    least every image token, or None. `managers`: the coordinator's
    single-type managers, in KV-group order."""
    from feather_vllm.kv.specs import StagedFullAttentionManager

    limit = request.num_tokens - 1  # vLLM's: the last prompt token is always computed
    found = []
    for manager in managers:
        spec, size = manager.kv_cache_spec, manager.block_size
        if not isinstance(manager, StagedFullAttentionManager) or manager.block_pool.hash_block_size != size:
            return None
        chain = CompactChain.of(decision, spec.feather_first_layer, spec.feather_end_layer, size)
        blocks, held = _group_hit(manager, request, chain, limit)
        found.append((blocks, chain.covered(held), chain))
    tokens = min(covered for _, covered, _ in found)
    if tokens < decision.image_end:
        return None
    taken = tuple(blocks[:-(-chain.held(tokens) // manager.block_size)]
                  for manager, (blocks, _, chain) in zip(managers, found))
    return Hit(decision, taken, tokens, tuple(chain for _, _, chain in found))
