"""Model-runner hooks (vLLM internals, pinned version): publish each real
step's batch to the model and tell the model when requests go away.

Patched methods of `vllm.v1.worker.gpu_model_runner.GPUModelRunner` (the CPU
runner inherits them):
- `execute_model`: the scope of one real step (dummy/profile runs go through
  `_dummy_run` instead, so they publish nothing).
- `_build_attention_metadata`: after vLLM built the per-group metadata, record
  per request its rows, prompt, image placeholders and `extra_args`.
- `_on_request_state_removed`: a finished or aborted request's pruning state
  is dropped.
- `sample_tokens`: the step's output carries the pruning records written in
  this step (`feather_records`) to the scheduler's process.
`AttentionGroup.build_metadata` is wrapped to record the
`CommonAttentionMetadata` that vLLM built for each KV-cache group, so the
model can rebuild the metadata of pruned layers from the same base.
"""

from __future__ import annotations

import functools
from copy import copy
from typing import Any

from feather_vllm import records
from feather_vllm.kv import step

_recording: dict[int, tuple[Any, Any]] | None = None
_in_execute = False


def _requests(runner: Any, common: Any, num_reqs: int) -> list[step.RequestSlice]:
    qsl = common.query_start_loc_cpu.tolist()
    batch = runner.input_batch
    out = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests[req_id]
        extra = state.sampling_params.extra_args if state.sampling_params else None
        out.append(step.RequestSlice(
            req_id=req_id,
            row_start=qsl[i],
            num_rows=qsl[i + 1] - qsl[i],
            num_computed=int(batch.num_computed_tokens_cpu[i]),
            prompt_len=int(batch.num_prompt_tokens[i]),
            image_ranges=[(f.mm_position.offset, f.mm_position.length)
                          for f in state.mm_features if f.modality == "image"],
            feather=(extra or {}).get("feather"),
        ))
    return out


def _groups(runner: Any, recorded: dict[int, tuple[Any, Any]]) -> tuple[list[step.GroupView], dict[str, int]]:
    views: list[step.GroupView] = []
    layer_group: dict[str, int] = {}
    any_common = next(iter(recorded.values()))[1]
    for gid, attn_groups in enumerate(runner.attn_groups):
        block_size = runner.kv_cache_config.kv_cache_groups[gid].kv_cache_spec.block_size
        for ag in attn_groups:
            if id(ag) in recorded:
                common = recorded[id(ag)][1]
            else:
                # Built through the backend's update_block_table shortcut: same
                # base metadata, this group's own block table.
                common = copy(any_common)
                common.block_table_tensor = runner.input_batch.block_table[gid].get_device_tensor(
                    any_common.num_reqs)
            for name in ag.layer_names:
                layer_group[name] = len(views)
            views.append(step.GroupView(list(ag.layer_names), ag, common, block_size))
    return views, layer_group


def _with_records(output: Any) -> Any:
    """Attach new pruning records to a step output (pickled to the engine
    core with its attributes)."""
    if output is not None and hasattr(output, "__dict__") and hasattr(output, "req_ids"):
        new = records.drain_new()
        if new:
            output.feather_records = new
    return output


def install() -> None:
    """Patch the runner once per process (idempotent)."""
    from vllm.v1.worker import utils as worker_utils
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_feather_patched", False):
        return
    GPUModelRunner._feather_patched = True

    original_build_group = worker_utils.AttentionGroup.build_metadata

    @functools.wraps(original_build_group)
    def build_metadata(self, common_attn_metadata, ubatch_idx=0, common_prefix_len=0, **kw):
        if _recording is not None:
            _recording[id(self)] = (self, common_attn_metadata)
        return original_build_group(self, common_attn_metadata, ubatch_idx, common_prefix_len, **kw)

    worker_utils.AttentionGroup.build_metadata = build_metadata

    original_execute = GPUModelRunner.execute_model

    @functools.wraps(original_execute)
    def execute_model(self, *args, **kwargs):
        global _in_execute
        _in_execute = True
        try:
            with step.publish(None):
                return _with_records(original_execute(self, *args, **kwargs))
        finally:
            _in_execute = False

    GPUModelRunner.execute_model = execute_model

    original_sample = GPUModelRunner.sample_tokens

    @functools.wraps(original_sample)
    def sample_tokens(self, *args, **kwargs):
        return _with_records(original_sample(self, *args, **kwargs))

    GPUModelRunner.sample_tokens = sample_tokens

    original_build = GPUModelRunner._build_attention_metadata

    @functools.wraps(original_build)
    def _build_attention_metadata(self, num_tokens, num_reqs, max_query_len, *args, **kwargs):
        global _recording
        real = _in_execute and not kwargs.get("for_cudagraph_capture", False) \
            and kwargs.get("ubatch_slices") is None
        _recording = {} if real else None
        try:
            result = original_build(self, num_tokens, num_reqs, max_query_len, *args, **kwargs)
            if real and _recording:
                groups, layer_group = _groups(self, _recording)
                common = groups[0].common
                step._current = step.StepBatch(
                    requests=_requests(self, common, num_reqs),
                    num_rows=int(common.num_actual_tokens),
                    groups=groups,
                    layer_group=layer_group,
                )
            return result
        finally:
            _recording = None

    GPUModelRunner._build_attention_metadata = _build_attention_metadata

    original_removed = GPUModelRunner._on_request_state_removed

    @functools.wraps(original_removed)
    def _on_request_state_removed(self, req_id, req_state):
        forget = getattr(self.get_model(), "forget_request", None) if hasattr(self, "model") else None
        if forget is not None:
            forget(req_id)
        return original_removed(self, req_id, req_state)

    GPUModelRunner._on_request_state_removed = _on_request_state_removed
