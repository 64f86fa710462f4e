"""Attention metadata of pruned layers in steps that do not cut
(runner-agnostic: it works on vLLM's `CommonAttentionMetadata` and plain
tensors; `kv.runner_v1` supplies them).

After its cutting prefill, a pruned request differs from an unpruned one
only in the metadata of the layers after each cut: there its KV holds
`dropped` fewer tokens, so its sequence length is shorter by `dropped` and
a token at position p (always after the image by then) is written at the
compact position p - dropped. The model then runs vLLM's own forward
(compiled, CUDA graphs on GPU).

Layers are partitioned by attention group and by the cut layers present in
the batch (`DecodeShift.part`). An attention group whose layers all lie in
one part is shifted *before* vLLM builds its metadata (`shifted`): that
build is the group's only one (the presets' cuts fall on KV-stage starts).
A group split by a cut (FastV's layer 3 inside stage [0, 4)) keeps vLLM's
build for its layers before the cut and gets one more build per later part
(`rebuild_split_groups`). Shifts and compact slots are computed on the
device for the whole batch from one table of dropped counts, copied up from
pinned memory without a sync.
"""

from __future__ import annotations

import bisect
import dataclasses
from copy import copy
from typing import Any

import numpy as np
import torch

from feather_vllm.kv.plan import WorkerPruning
from feather_vllm.kv.step import GroupBase


@dataclasses.dataclass(frozen=True)
class DecodeShift:
    """The pruned requests of one step: for request row i and the k-th cut
    layer of the batch passed, the image tokens request i lacks there
    (column 0: before any cut, all zeros)."""

    cuts: list[int]  # the batch's cut layers, ascending
    cpu: torch.Tensor  # (request rows, len(cuts) + 1), int32
    device: torch.Tensor  # the same on the device

    def part(self, layer: int) -> int:
        """Index of the column that applies to `layer`."""
        return bisect.bisect_right(self.cuts, layer)

    def shifts(self, k: int) -> bool:
        return k > 0 and bool(self.cpu[:, k].any())


def shift_of(states: list[WorkerPruning | None], num_rows: int, device: torch.device) -> DecodeShift | None:
    """The step's `DecodeShift` for `states` (one per request row; the
    table has `num_rows`, the padded request count), or None when no
    request in the batch has cut. On a GPU the table goes up from pinned
    memory (PyTorch's caching host allocator: no stream sync, and no reuse
    before the copy is done)."""
    cuts = sorted({stage.layer for s in states if s is not None and s.kept for stage in s.kept.stages})
    if not cuts:
        return None
    table = np.zeros((num_rows, len(cuts) + 1), dtype=np.int32)
    for i, state in enumerate(states):
        if state is not None and state.kept:
            for k, cut in enumerate(cuts, start=1):
                table[i, k] = state.dropped_at(cut)
    cpu = torch.from_numpy(table)
    if device.type == "cuda":
        cpu = cpu.pin_memory()
    return DecodeShift(cuts, cpu, cpu.to(device, non_blocking=True))


def single_part(layer_indices: tuple[int, ...], shift: DecodeShift) -> int | None:
    """The one part all these layers lie in, or None when a cut splits them."""
    parts = {shift.part(layer) for layer in layer_indices}
    return parts.pop() if len(parts) == 1 else None


def compact_slots(block_table: torch.Tensor, block_size: int, req_indices: torch.Tensor, positions: torch.Tensor,
                  shift: torch.Tensor) -> torch.Tensor:
    """Slots of tokens at `positions - shift[request]` in the group's blocks
    (vLLM's slot-mapping rule, on compact positions)."""
    compact = positions - shift[req_indices]
    blocks = block_table[req_indices, torch.div(compact, block_size, rounding_mode="floor")]
    return blocks.to(torch.int64) * block_size + compact % block_size


def shifted(common: Any, shift: DecodeShift, k: int, block_size: int, req_indices: torch.Tensor,
            positions: torch.Tensor) -> Any:
    """A copy of `common` (CommonAttentionMetadata) for layers in part `k`:
    shorter sequences and compact slots for the first `len(positions)`
    tokens (the real ones; padding keeps vLLM's slots)."""
    column = shift.device[:, k]
    cm = copy(common)
    cm.seq_lens = common.seq_lens - column
    if common.seq_lens_cpu_upper_bound is not None:
        cm.seq_lens_cpu_upper_bound = common.seq_lens_cpu_upper_bound - shift.cpu[:, k]
    slots = common.slot_mapping.clone()
    slots[:positions.shape[0]] = compact_slots(common.block_table_tensor, block_size, req_indices, positions, column)
    cm.slot_mapping = slots
    return cm


def rebuild_split_groups(bases: list[GroupBase], shift: DecodeShift, req_indices: torch.Tensor,
                         positions: torch.Tensor, attn_metadata: dict[str, Any],
                         slot_by_layer: dict[str, torch.Tensor], done: set[int]) -> int:
    """Point the pruned layers of the groups not shifted before vLLM's build
    (`done`: ids of those that were) at compact metadata, one build per part
    after a cut; `attn_metadata` and `slot_by_layer` (the step's per-layer
    dicts) are edited in place. Returns the number of builds."""
    builds = 0
    for base in bases:
        if id(base.attn_group) in done:
            continue
        parts: dict[int, list[str]] = {}
        for name, layer in zip(base.attn_group.layer_names, base.layer_indices):
            parts.setdefault(shift.part(layer), []).append(name)
        for k, names in parts.items():
            if not shift.shifts(k):
                continue
            cm = shifted(base.common, shift, k, base.block_size, req_indices, positions)
            metadata = base.attn_group.build_metadata(cm)
            builds += 1
            for name in names:
                attn_metadata[name] = metadata
                slot_by_layer[name] = cm.slot_mapping
    return builds
