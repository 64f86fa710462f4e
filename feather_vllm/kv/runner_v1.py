"""The model-runner seam for vLLM's V1 runner
(`vllm.v1.worker.gpu_model_runner.GPUModelRunner`, which the CPU runner
inherits; deleted in vLLM 0.34: `docs/model_runner_v2.md` maps each piece
onto Model Runner V2). The only module that reads a runner's private state
(requests, input batch, block tables, positions, slot mappings, outputs);
`kv.step` and `kv.decode_metadata` work on what it hands them. Inert unless
the loaded model is the FEATHER architecture.

- `_update_states`: lifecycle of the worker's pruning state. Blocks the
  scheduler freed after a cut leave the request's block table first; a new
  or resumed request starts without pruning state; the plans that came with
  the step (`SchedulerOutput.feather_plans`) go onto their requests' cached
  states, and those requests cut in this step (a plan that reuses an
  earlier turn's kept set comes with it: no cut, unless it adds back
  tokens: its images' embeddings, which the scheduler had encoded again,
  come from the encoder cache). The worker never decides.
- `_build_attention_metadata`: in a step where some request cuts, publish
  the batch (`kv.step.StepBatch`) for the model's cutting forward; in any
  other step, shift the pruned layers' metadata (`kv.decode_metadata`):
  groups whose layers lie between two cuts before vLLM's own build (their
  only build), groups split by a cut after it. The model then runs vLLM's
  own (compiled) forward.
- `execute_model` / `sample_tokens`: the scope of a real step (dummy and
  profile runs publish nothing), and the kept tokens of the requests that
  cut ride the step's `ModelRunnerOutput` as `feather_kept`, also when
  async scheduling wraps it in an `AsyncModelRunnerOutput`.
"""

from __future__ import annotations

import dataclasses
import functools
from copy import copy
from typing import Any

from feather_vllm.kv import decode_metadata, step
from feather_vllm.kv.plan import KeptTokens, WorkerPruning

ATTR = "feather_pruning"  # the WorkerPruning on the runner's CachedRequestState


@dataclasses.dataclass
class _Build:
    """What the `AttentionGroup.build_metadata` wrapper does during one
    `_build_attention_metadata` call of a real step."""

    recorded: dict[int, Any]  # id(AttentionGroup) -> the common metadata vLLM built it from
    # id(AttentionGroup) -> (part, block size, layer names): shifted before vLLM's build
    shift_before: dict[int, tuple[int, int, list[str]]]
    shift: decode_metadata.DecodeShift | None = None
    req_indices: Any = None
    positions: Any = None
    slot_by_layer: dict[str, Any] | None = None


_build: _Build | None = None


def _is_feather(runner: Any) -> bool:
    on = getattr(runner, "_feather_on", None)
    if on is None:
        from feather_vllm.model import FeatherPruning

        on = runner._feather_on = isinstance(runner.get_model(), FeatherPruning)
    return on


def _layer_index(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _groups(runner: Any) -> list[tuple[int, Any, tuple[int, ...]]]:
    """(KV group, attention group, decoder layer of each of its layers)."""
    out = getattr(runner, "_feather_groups", None)
    if out is None:
        out = runner._feather_groups = [
            (gid, ag, tuple(_layer_index(n) for n in ag.layer_names))
            for gid, attn_groups in enumerate(runner.attn_groups) for ag in attn_groups]
    return out


def _bases(runner: Any, recorded: dict[int, Any], slot_mappings: dict[int, Any],
           num_reqs_padded: int) -> list[step.GroupBase]:
    """Each attention group's base metadata in this step."""
    any_common = next(iter(recorded.values()))
    bases = []
    for gid, ag, layers in _groups(runner):
        block_table = runner.input_batch.block_table[gid]
        common = recorded.get(id(ag))
        if common is None:
            # Built through the backend's update_block_table shortcut: the
            # same base, this group's own block table and slots.
            common = copy(any_common)
            common.block_table_tensor = block_table.get_device_tensor(num_reqs_padded)
            common.slot_mapping = slot_mappings[gid]
        bases.append(step.GroupBase(ag, common, block_table.block_size, layers))
    return bases


def _states(runner: Any, num_reqs: int) -> list[WorkerPruning | None]:
    requests = runner.requests
    return [getattr(requests[r], ATTR, None) for r in runner.input_batch.req_ids[:num_reqs]]


def _step_batch(runner: Any, bases: list[step.GroupBase], num_reqs: int) -> step.StepBatch:
    common = bases[0].common
    qsl = common.query_start_loc_cpu.tolist()
    batch = runner.input_batch
    cutting = runner._feather_cutting
    requests = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        state = runner.requests[req_id]
        requests.append(step.RequestSlice(
            req_id=req_id, row_start=qsl[i], num_rows=qsl[i + 1] - qsl[i],
            num_computed=int(batch.num_computed_tokens_cpu[i]),
            prompt_len=int(batch.num_prompt_tokens[i]),
            pruning=getattr(state, ATTR, None), cuts_now=req_id in cutting,
            image_hashes=tuple(f.identifier for f in state.mm_features if f.modality == "image")))
    layer_group = {name: g for g, base in enumerate(bases) for name in base.attn_group.layer_names}
    # The encoder runs after the metadata is built: the model reads its outputs when it needs them.
    return step.StepBatch(requests=requests, groups=bases, layer_group=layer_group,
                          encoder_output=runner._get_encoder_output_from_cache)


def _trim_blocks(runner: Any, req_id: str, counts: dict[int, int]) -> None:
    """Cut the request's block list of each KV group to `counts[group]`
    blocks (the scheduler freed the rest)."""
    state = runner.requests.get(req_id)
    if state is None:
        return
    row = runner.input_batch.req_id_to_index.get(req_id)
    for group, count in counts.items():
        del state.block_ids[group][count:]
        if row is not None:
            table = runner.input_batch.block_table[group]
            table.num_blocks_per_row[row] = min(int(table.num_blocks_per_row[row]), count)


def attach_kept(output: Any, kept: dict[str, KeptTokens]) -> bool:
    """Put `kept` on a step's ModelRunnerOutput as `feather_kept` (pickled
    to the scheduler's process with it); with async scheduling, on the
    ModelRunnerOutput that its AsyncModelRunnerOutput will return. False
    when `output` carries no step (then the next output takes them)."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

    target = getattr(output, "_model_runner_output", None) if isinstance(output, AsyncModelRunnerOutput) \
        else output
    if not isinstance(target, ModelRunnerOutput) or target is EMPTY_MODEL_RUNNER_OUTPUT:
        return False
    target.feather_kept = kept
    return True


def _plan_decode(runner: Any, num_tokens: int, num_reqs: int, num_reqs_padded: int) -> _Build:
    """The decode shift of a step without cuts, and which attention groups
    take it before vLLM's build."""
    shift = decode_metadata.shift_of(_states(runner, num_reqs), num_reqs_padded, runner.positions.device)
    build = _Build(recorded={}, shift_before={}, shift=shift)
    if shift is None:
        return build
    build.req_indices = runner.req_indices.gpu[:num_tokens]
    build.positions = runner.positions[:num_tokens]
    build.slot_by_layer = runner._feather_slot_by_layer
    for gid, ag, layers in _groups(runner):
        k = decode_metadata.single_part(layers, shift)
        if k is not None and shift.shifts(k):
            build.shift_before[id(ag)] = (k, runner.input_batch.block_table[gid].block_size, list(ag.layer_names))
    return build


def install() -> None:
    """Patch the runner once per process (idempotent)."""
    from vllm.v1.worker import utils as worker_utils
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_feather_patched", False):
        return
    GPUModelRunner._feather_patched = True
    GPUModelRunner._feather_cutting = frozenset()
    GPUModelRunner._feather_in_step = False
    GPUModelRunner._feather_pending = {}  # kept tokens not yet on an output

    original_build_group = worker_utils.AttentionGroup.build_metadata

    @functools.wraps(original_build_group)
    def build_metadata(self, common_attn_metadata, *args, **kwargs):
        if _build is not None:
            _build.recorded[id(self)] = common_attn_metadata
            before = _build.shift_before.get(id(self))
            if before is not None:
                k, block_size, names = before
                common_attn_metadata = decode_metadata.shifted(
                    common_attn_metadata, _build.shift, k, block_size, _build.req_indices, _build.positions)
                for name in names:
                    _build.slot_by_layer[name] = common_attn_metadata.slot_mapping
        return original_build_group(self, common_attn_metadata, *args, **kwargs)

    worker_utils.AttentionGroup.build_metadata = build_metadata

    original_update = GPUModelRunner._update_states

    @functools.wraps(original_update)
    def _update_states(self, scheduler_output, *args, **kwargs):
        # Blocks the scheduler freed after a cut go before this step's new
        # blocks are appended, so both sides keep the same block list.
        for req_id, counts in (getattr(scheduler_output, "feather_trims", None) or {}).items():
            _trim_blocks(self, req_id, counts)
        result = original_update(self, scheduler_output, *args, **kwargs)
        # A request's pruning state belongs to one life of it: a new request,
        # or one resumed after preemption (its KV recomputed from scratch),
        # starts without any; only the plan the scheduler sends with the
        # step that cuts sets it. Never read from a previous life.
        started = {r.req_id for r in scheduler_output.scheduled_new_reqs} | \
            set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        for req_id in started:
            state = self.requests.get(req_id)
            if state is not None and getattr(state, ATTR, None) is not None:
                setattr(state, ATTR, None)
        plans = getattr(scheduler_output, "feather_plans", None) or {}
        for req_id, plan in plans.items():
            # A plan that reuses an earlier turn's kept set needs no cut: its
            # request reads and writes compact KV from its first token on
            # (one that adds back runs the cutting forward, to add them).
            setattr(self.requests[req_id], ATTR, WorkerPruning(plan, kept=plan.reuse))
        self._feather_cutting = frozenset(req_id for req_id, plan in plans.items()
                                          if plan.reuse is None or plan.adds_back)
        return result

    GPUModelRunner._update_states = _update_states

    original_execute = GPUModelRunner.execute_model

    @functools.wraps(original_execute)
    def execute_model(self, *args, **kwargs):
        if not _is_feather(self):
            return original_execute(self, *args, **kwargs)
        self._feather_in_step = True
        try:
            with step.publish(None):
                output = original_execute(self, *args, **kwargs)
        finally:
            self._feather_in_step = False
        if self._feather_cutting:
            for req_id in self._feather_cutting:
                pruning = getattr(self.requests.get(req_id), ATTR, None)
                if pruning is not None and pruning.kept is not None:
                    self._feather_pending = {**self._feather_pending, req_id: pruning.kept}
            self._feather_cutting = frozenset()
        return output

    GPUModelRunner.execute_model = execute_model

    original_sample = GPUModelRunner.sample_tokens

    @functools.wraps(original_sample)
    def sample_tokens(self, *args, **kwargs):
        output = original_sample(self, *args, **kwargs)
        if self._feather_pending and attach_kept(output, self._feather_pending):
            self._feather_pending = {}
        return output

    GPUModelRunner.sample_tokens = sample_tokens

    original_slots = GPUModelRunner._get_slot_mappings

    @functools.wraps(original_slots)
    def _get_slot_mappings(self, *args, **kwargs):
        by_group, by_layer = original_slots(self, *args, **kwargs)
        self._feather_slot_by_layer = by_layer
        return by_group, by_layer

    GPUModelRunner._get_slot_mappings = _get_slot_mappings

    original_build = GPUModelRunner._build_attention_metadata

    @functools.wraps(original_build)
    def _build_attention_metadata(self, num_tokens, num_reqs, max_query_len, *args, **kwargs):
        global _build
        if not self._feather_in_step or kwargs.get("for_cudagraph_capture", False):
            return original_build(self, num_tokens, num_reqs, max_query_len, *args, **kwargs)
        num_reqs_padded = kwargs.get("num_reqs_padded") or num_reqs
        build = _Build(recorded={}, shift_before={}) if self._feather_cutting else \
            _plan_decode(self, num_tokens, num_reqs, num_reqs_padded)
        _build = build
        try:
            result = original_build(self, num_tokens, num_reqs, max_query_len, *args, **kwargs)
        finally:
            _build = None
        if not build.recorded:
            return result
        bases = _bases(self, build.recorded, kwargs["slot_mappings"], num_reqs_padded)
        if self._feather_cutting:
            step._current = _step_batch(self, bases, num_reqs)
        elif build.shift is not None:
            # Groups vLLM built through update_block_table (GPU, equal specs)
            # never reached the wrapper: they are rebuilt with the rest.
            done = set(build.shift_before) & set(build.recorded)
            decode_metadata.rebuild_split_groups(bases, build.shift, build.req_indices, build.positions,
                                                 result[0], self._feather_slot_by_layer, done)
        return result

    GPUModelRunner._build_attention_metadata = _build_attention_metadata
