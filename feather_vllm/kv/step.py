"""What the model needs to know about the batch of one engine step.

The model runner seam (`kv.runner_v1`) publishes a `StepBatch` before the
forward pass of a step in which some request cuts or adds back (its plan
arrived with this step); `FeatherLlavaForConditionalGeneration` reads it
to find each request's rows, pruning and image embeddings, and asks it
(`retarget`) to rewrite the attention metadata and KV slots of the layers
after a cut (and of those before it, for a step's probes). Runner-agnostic:
it works on vLLM's `CommonAttentionMetadata`, its forward context, plain
tensors and a lookup of the step's encoder outputs. Other steps (decode, unpruned prefills) and dummy/profiling runs
publish nothing: the model runs vLLM's own forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from copy import copy
from typing import Any

import torch

from feather_vllm.kv.plan import WorkerPruning


@dataclasses.dataclass
class RequestSlice:
    """One request's share of the step's token rows."""

    req_id: str
    row_start: int  # first row of this request in the step's flattened batch
    num_rows: int  # tokens scheduled for it in this step
    num_computed: int  # tokens already in its KV cache before this step
    prompt_len: int
    pruning: WorkerPruning | None  # its plan and what earlier cuts kept
    cuts_now: bool  # its plan arrived with this step: the model cuts it (or adds back)
    image_hashes: tuple[str, ...] = ()  # per image, its multimodal hash (its encoder output's key)

    @property
    def adds_back(self) -> bool:
        return self.cuts_now and self.pruning is not None and self.pruning.plan.adds_back

    @property
    def seq_len(self) -> int:
        """Tokens in the sequence once this step has run."""
        return self.num_computed + self.num_rows


@dataclasses.dataclass(frozen=True)
class GroupBase:
    """What vLLM built for one attention group (of one KV-cache group) in
    this step: the base every metadata rewrite starts from."""

    attn_group: Any  # vllm.v1.worker.utils.AttentionGroup
    common: Any  # CommonAttentionMetadata with this group's block table and slots
    block_size: int  # tokens per block of the group's block table
    layer_indices: tuple[int, ...]  # decoder layer of each name in attn_group.layer_names


# Row keys: the model orders the rows of a cutting step by key. Step row r
# has key r * ROW_STRIDE + ROW_STRIDE - 1; rows a request adds before its
# own (added-back image tokens) take r * ROW_STRIDE + j, r its first row;
# rows that are one-token queries of their own (`Probes`) take negative keys.
ROW_STRIDE = 1 << 24


def row_keys(rows: torch.Tensor) -> torch.Tensor:
    """The keys of step rows `rows`."""
    return rows * ROW_STRIDE + (ROW_STRIDE - 1)


def is_step_row(keys: torch.Tensor) -> torch.Tensor:
    """Which keys are step rows (not added or probe rows)."""
    return (keys >= 0) & (keys % ROW_STRIDE == ROW_STRIDE - 1)


@dataclasses.dataclass(frozen=True)
class Probes:
    """Rows at the head of the current rows, each a one-token query of its
    own: an image token of `request` (index into the batch) recomputed at
    its position over that request's cached KV, which it reads up to and
    including its own slot and never writes (slot -1)."""

    request: int
    positions: torch.Tensor  # (CPU) the probed tokens' positions, in row order

    @property
    def count(self) -> int:
        return self.positions.numel()


@dataclasses.dataclass
class StepBatch:
    requests: list[RequestSlice]
    groups: list[GroupBase]
    layer_group: dict[str, int]  # attention layer name -> index into groups
    encoder_output: Callable[[str], Any] | None = None  # the step's encoder outputs, by multimodal hash

    def image_embeds(self, request: RequestSlice) -> list[Any]:
        """`request`'s image embeddings, in prompt order (a step that adds
        back has its images encoded, or finds them still in the encoder cache)."""
        embeds = [self.encoder_output(h) if self.encoder_output else None for h in request.image_hashes]
        if any(e is None for e in embeds):
            raise RuntimeError(f"request {request.req_id} adds back image tokens, but an image's encoder output "
                               "is not in the encoder cache")
        return embeds

    def retarget(self, layer_names: list[str], keys: torch.Tensor, positions: torch.Tensor,
                 dropped: list[torch.Tensor | None], added: list[int] | None = None,
                 probes: list[Probes] | None = None) -> None:
        """Point `layer_names` (layers between two cuts) at attention
        metadata and KV slots for the step's current rows (their keys,
        ascending) at `positions`; `dropped[i]` are the absolute positions
        of request i's image tokens absent from these layers (ascending;
        None or empty: none). Kept tokens land at compact positions:
        position minus the dropped tokens before it. `added[i]` rows of
        request i precede its own: image tokens added back, held right after
        its cached tokens (its own then shift by as many). `probes`: the
        head rows' one-token queries, in order."""
        from vllm.forward_context import get_forward_context

        fc = get_forward_context()
        device = keys.device
        added = added or [0] * len(self.requests)
        probes = probes or []
        num_probes = sum(p.count for p in probes)
        # Request row ranges among the current rows: one host copy of the keys.
        bounds = torch.tensor([r.row_start for r in self.requests] +
                              [self.requests[-1].row_start + self.requests[-1].num_rows]) * ROW_STRIDE
        edges = torch.searchsorted(keys.cpu(), bounds)
        qsl = torch.zeros(num_probes + len(self.requests) + 1, dtype=torch.int32)
        qsl[1:num_probes + 1] = torch.arange(1, num_probes + 1)
        qsl[num_probes + 1:] = num_probes + torch.cumsum(edges[1:] - edges[:-1], 0)
        seq_lens = torch.tensor([r.seq_len - (0 if d is None else d.numel()) + a
                                 for r, d, a in zip(self.requests, dropped, added)], dtype=torch.int32)
        if probes:
            seq_lens = torch.cat([*(p.positions.to(torch.int32) + 1 for p in probes), seq_lens])
        shifted = [(i, int(edges[i]), int(edges[i + 1]), d.to(device), added[i]) for i, d in enumerate(dropped)
                   if d is not None and d.numel()]
        real = keys.clamp(min=0) // ROW_STRIDE
        built: dict[int, tuple[Any, torch.Tensor]] = {}
        for name in layer_names:
            g = self.layer_group[name]
            if g not in built:
                view = self.groups[g]
                slots = fc.slot_mapping[name][real].clone()
                slots[:num_probes] = -1
                block_table, size = view.common.block_table_tensor, view.block_size
                for i, lo, hi, d, a in shifted:  # on the device: compact position -> block -> slot
                    pos = positions[lo:hi].long()
                    compact = pos - torch.searchsorted(d, pos) + a
                    # Added rows: right after the tokens the request had cached.
                    compact[:a] = self.requests[i].num_computed - d.numel() + torch.arange(a, device=device)
                    slots[lo:hi] = block_table[i, compact // size].long() * size + compact % size
                if probes:
                    block_table = torch.cat([block_table[p.request].expand(p.count, -1) for p in probes] +
                                            [block_table[:len(self.requests)]])
                built[g] = (self._metadata(g, qsl, seq_lens, slots, positions, block_table, num_probes), slots)
            fc.attn_metadata[name], fc.slot_mapping[name] = built[g]

    def _metadata(self, group: int, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  slot_mapping: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor,
                  num_probes: int) -> Any:
        """Attention metadata of `group` for a compacted set of rows.

        `query_start_loc` and `seq_lens` are per request (CPU, int32) in the
        pruned layers' own (compact) token space, `num_probes` one-token
        requests first; `slot_mapping` is per row. Rows past the last request
        (CUDA-graph padding) are not attended.
        """
        view = self.groups[group]
        cm = copy(view.common)
        device = view.common.query_start_loc.device
        cm.query_start_loc_cpu = query_start_loc
        cm.query_start_loc = query_start_loc.to(device, non_blocking=True)
        cm.seq_lens = seq_lens.to(device, non_blocking=True)
        cm.seq_lens_cpu_upper_bound = seq_lens
        cm.num_actual_tokens = int(query_start_loc[-1])
        q = query_start_loc[1:] - query_start_loc[:-1]
        cm.max_query_len = int(q.max()) if q.numel() else 0
        cm.max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
        cm.slot_mapping = slot_mapping.to(device, non_blocking=True)
        cm.positions = positions
        cm._num_computed_tokens_cache = cm._token_to_req_indices_cache = None  # of vLLM's rows
        if num_probes:
            # Probes are decodes: first, as backends that split decodes from prefills expect.
            cm.num_reqs = query_start_loc.numel() - 1
            cm.block_table_tensor = block_table
            if cm.is_prefilling is not None:
                cm.is_prefilling = torch.cat([torch.zeros(num_probes, dtype=torch.bool, device=device),
                                              cm.is_prefilling[:cm.num_reqs - num_probes]])
            cm.req_idx = None
        return view.attn_group.build_metadata(cm)


_current: StepBatch | None = None


def current() -> StepBatch | None:
    """The batch of the forward pass in progress, if it is a real step."""
    return _current


@contextlib.contextmanager
def publish(batch: StepBatch | None) -> Iterator[None]:
    global _current
    previous, _current = _current, batch
    try:
        yield
    finally:
        _current = previous
