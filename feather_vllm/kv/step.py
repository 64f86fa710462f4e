"""What the model needs to know about the batch of one engine step.

The model runner seam (`kv.runner_v1`) publishes a `StepBatch` before the
forward pass of a step in which some request cuts (its plan arrived with
this step); `FeatherLlavaForConditionalGeneration` reads it to find each
request's rows and pruning, and asks it (`retarget`) to rewrite the
attention metadata and KV slots of the layers after a cut. Runner-agnostic:
it works on vLLM's `CommonAttentionMetadata`, its forward context and plain
tensors. Other steps (decode, unpruned prefills) and dummy/profiling runs
publish nothing: the model runs vLLM's own forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
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
    cuts_now: bool  # its plan arrived with this step: the model cuts it

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


@dataclasses.dataclass
class StepBatch:
    requests: list[RequestSlice]
    groups: list[GroupBase]
    layer_group: dict[str, int]  # attention layer name -> index into groups

    def retarget(self, layer_names: list[str], rows: torch.Tensor, positions: torch.Tensor,
                 dropped: list[torch.Tensor | None]) -> None:
        """Point `layer_names` (layers between two cuts) at attention
        metadata and KV slots for the step's surviving `rows` (original row
        of each, ascending) at `positions`; `dropped[i]` are the absolute
        positions of request i's image tokens absent from these layers
        (ascending; None or empty: none). Kept tokens land at compact
        positions: position minus the dropped tokens before it."""
        from vllm.forward_context import get_forward_context

        fc = get_forward_context()
        device = rows.device
        # Request row ranges among the survivors: one host copy of the rows.
        bounds = torch.tensor([r.row_start for r in self.requests] +
                              [self.requests[-1].row_start + self.requests[-1].num_rows])
        edges = torch.searchsorted(rows.cpu(), bounds)
        qsl = torch.zeros(len(self.requests) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(edges[1:] - edges[:-1], 0)
        seq_lens = torch.tensor([r.seq_len - (0 if d is None else d.numel()) for r, d in zip(self.requests, dropped)],
                                dtype=torch.int32)
        shifted = [(i, int(edges[i]), int(edges[i + 1]), d.to(device)) for i, d in enumerate(dropped)
                   if d is not None and d.numel()]
        built: dict[int, tuple[Any, torch.Tensor]] = {}
        for name in layer_names:
            g = self.layer_group[name]
            if g not in built:
                view = self.groups[g]
                slots = fc.slot_mapping[name][rows].clone()
                block_table, size = view.common.block_table_tensor, view.block_size
                for i, lo, hi, d in shifted:  # on the device: compact position -> block -> slot
                    pos = positions[lo:hi].long()
                    compact = pos - torch.searchsorted(d, pos)
                    slots[lo:hi] = block_table[i, compact // size].long() * size + compact % size
                built[g] = (self._metadata(g, qsl, seq_lens, slots, positions), slots)
            fc.attn_metadata[name], fc.slot_mapping[name] = built[g]

    def _metadata(self, group: int, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  slot_mapping: torch.Tensor, positions: torch.Tensor) -> Any:
        """Attention metadata of `group` for a compacted set of rows.

        `query_start_loc` and `seq_lens` are per request (CPU, int32) in the
        pruned layers' own (compact) token space; `slot_mapping` is per row.
        Rows past the last request (CUDA-graph padding) are not attended.
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
