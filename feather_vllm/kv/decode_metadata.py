"""Attention metadata of pruned layers in steps that do not cut (vLLM
internals, pinned version).

After its cutting prefill, a pruned request differs from an unpruned one
only in the metadata of the layers after each cut: there its KV holds
`dropped` fewer tokens, so its sequence length is shorter by `dropped` and
a token at position p (always after the image by then) is written at the
compact position p - dropped. The model then runs vLLM's own forward
(compiled, CUDA graphs on GPU).

Layers are partitioned by KV group and by the cut layers present in the
batch; each part with a pruned request gets one metadata build from its
group's own base, with seq_lens and slot mapping shifted on the device for
the whole batch at once. Host work is one table of the batch's dropped
counts (known on the host since the cut), copied once; no per-request
device round trip.
"""

from __future__ import annotations

import bisect
from copy import copy
from typing import Any

import numpy as np
import torch

from feather_vllm.kv.plan import WorkerPruning
from feather_vllm.kv.step import GroupBase


def dropped_table(states: list[WorkerPruning | None], num_rows: int) -> tuple[list[int], np.ndarray]:
    """(cut points, table): the sorted cut layers of the batch's pruned
    requests, and for each request row i and k cut points passed the image
    tokens request i lacks there (`table[i, k]`, column 0 all zeros)."""
    cuts = sorted({stage.layer for s in states if s is not None and s.kept for stage in s.kept.stages})
    table = np.zeros((num_rows, len(cuts) + 1), dtype=np.int32)
    for i, state in enumerate(states):
        if state is not None and state.kept:
            for k, cut in enumerate(cuts, start=1):
                table[i, k] = state.dropped_at(cut)
    return cuts, table


def compact_slots(block_table: Any, req_indices: torch.Tensor, positions: torch.Tensor,
                  shift: torch.Tensor) -> torch.Tensor:
    """Slots of tokens at `positions - shift[request]` in the group's blocks
    (vLLM's slot-mapping rule, on compact positions)."""
    size = block_table.block_size
    compact = positions - shift[req_indices]
    blocks = block_table.block_table.gpu[req_indices, torch.div(compact, size, rounding_mode="floor")]
    return blocks.to(torch.int64) * size + compact % size


def apply(bases: list[GroupBase], states: list[WorkerPruning | None], req_indices: torch.Tensor,
          positions: torch.Tensor, attn_metadata: dict[str, Any], slot_by_layer: dict[str, torch.Tensor]) -> int:
    """Point the pruned layers of `attn_metadata` and `slot_by_layer` (the
    step's per-layer dicts, edited in place) at compact metadata. Returns
    the number of metadata builds (0 when no request in the batch is pruned)."""
    if not any(s is not None and s.kept for s in states):
        return 0
    num_rows = bases[0].common.num_reqs  # padded request rows
    cuts, table = dropped_table(states, num_rows)
    device = positions.device
    table_cpu = torch.from_numpy(table)
    table_dev = table_cpu.to(device, non_blocking=True)
    num_tokens = positions.shape[0]
    builds = 0
    for base in bases:
        parts: dict[int, list[str]] = {}
        for name, layer in zip(base.attn_group.layer_names, base.layer_indices):
            parts.setdefault(bisect.bisect_right(cuts, layer), []).append(name)
        for k, names in parts.items():
            if k == 0 or not table[:, k].any():
                continue
            shift = table_dev[:, k]
            cm = copy(base.common)
            cm.seq_lens = base.common.seq_lens - shift
            if base.common.seq_lens_cpu_upper_bound is not None:
                cm.seq_lens_cpu_upper_bound = base.common.seq_lens_cpu_upper_bound - table_cpu[:, k]
            slots = base.common.slot_mapping.clone()
            slots[:num_tokens] = compact_slots(base.block_table, req_indices, positions, shift)
            cm.slot_mapping = slots
            metadata = base.attn_group.build_metadata(cm)
            builds += 1
            for name in names:
                attn_metadata[name] = metadata
                slot_by_layer[name] = slots
    return builds
