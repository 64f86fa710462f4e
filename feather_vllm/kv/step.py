"""What the model needs to know about the batch of one engine step.

The model runner (vLLM internals) publishes a `StepBatch` before each real
forward pass; `FeatherLlavaForConditionalGeneration` reads it to find each
request's rows, image placeholders and pruning settings, and asks it to
re-target the attention metadata of the layers after a cut. Dummy and
profiling runs publish nothing, so the model runs the stock forward there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from copy import copy
from typing import Any

import torch


@dataclasses.dataclass
class RequestSlice:
    """One request's share of the step's token rows."""

    req_id: str
    row_start: int  # first row of this request in the step's flattened batch
    num_rows: int  # tokens scheduled for it in this step
    num_computed: int  # tokens already in its KV cache before this step
    prompt_len: int
    image_ranges: list[tuple[int, int]]  # (offset, length) within the prompt
    feather: Any  # SamplingParams.extra_args["feather"], or None

    @property
    def seq_len(self) -> int:
        """Tokens in the sequence once this step has run."""
        return self.num_computed + self.num_rows


@dataclasses.dataclass
class GroupView:
    """One KV-cache group: its layers and how to rebuild their metadata."""

    layer_names: list[str]
    attn_group: Any  # vllm.v1.worker.utils.AttentionGroup
    common: Any  # vllm.v1.attention.backend.CommonAttentionMetadata
    block_size: int


@dataclasses.dataclass
class StepBatch:
    requests: list[RequestSlice]
    num_rows: int  # rows the model is given (may include padding)
    groups: list[GroupView]
    layer_group: dict[str, int]  # attention layer name -> index into groups

    def rebuild_metadata(
        self,
        group: int,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        slot_mapping: torch.Tensor,
        positions: torch.Tensor,
        num_rows: int,
    ) -> Any:
        """Attention metadata of `group` for a compacted set of rows.

        `query_start_loc` and `seq_lens` are per request (CPU, int32) in the
        pruned layers' own (compact) token space; `slot_mapping` is per row.
        """
        view = self.groups[group]
        cm = copy(view.common)
        device = view.common.query_start_loc.device
        cm.query_start_loc_cpu = query_start_loc
        cm.query_start_loc = query_start_loc.to(device, non_blocking=True)
        cm.seq_lens = seq_lens.to(device, non_blocking=True)
        cm.seq_lens_cpu_upper_bound = seq_lens
        cm.num_actual_tokens = num_rows
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
