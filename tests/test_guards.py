"""Engine settings the integration does not cover are refused at engine
start, each named in the error; never silent corruption."""

from __future__ import annotations

import copy

import pytest

from feather_vllm.kv import guards


@pytest.fixture(scope="module")
def vllm_config(tiny_checkpoint):
    """The engine config the gateway's settings give (nothing refused)."""
    from vllm.engine.arg_utils import EngineArgs

    from feather_vllm.engine import engine_kwargs

    return EngineArgs(**engine_kwargs(str(tiny_checkpoint), dtype="float32", max_model_len=1024,
                                      kv_cache_bytes=2**28)).create_engine_config()


def test_default_settings_pass(vllm_config):
    assert guards.problems(vllm_config) == []
    assert vllm_config.compilation_config.cudagraph_mode.name in ("PIECEWISE", "NONE")


def _with(config, path: str, value):
    """A copy of `config` with one (possibly nested) field replaced."""
    head, _, field = path.rpartition(".")
    out = copy.copy(config)
    target = out
    if head:
        target = copy.copy(getattr(config, head))
        object.__setattr__(out, head, target)
    object.__setattr__(target, field, value)
    return out


@pytest.mark.parametrize("path,value,named", [
    ("parallel_config.pipeline_parallel_size", 2, "--pipeline-parallel-size"),
    ("parallel_config.decode_context_parallel_size", 2, "--decode-context-parallel-size"),
    ("parallel_config.prefill_context_parallel_size", 2, "--prefill-context-parallel-size"),
    ("parallel_config.enable_dbo", True, "--enable-dbo"),
    ("speculative_config", object(), "--speculative-config"),
], ids=["pipeline", "dcp", "pcp", "dbo", "speculative"])
def test_unsupported_setting_is_named(vllm_config, path, value, named):
    found = guards.problems(_with(vllm_config, path, value))
    assert len(found) == 1 and named in found[0]


@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_full_cuda_graphs_are_refused(vllm_config, mode):
    from vllm.config.compilation import CUDAGraphMode

    found = guards.problems(_with(vllm_config, "compilation_config.cudagraph_mode", CUDAGraphMode[mode]))
    assert len(found) == 1 and f"cudagraph_mode={mode}" in found[0]


def test_v2_model_runner_is_refused(vllm_config, monkeypatch):
    """vLLM's GPU default; the CPU build refuses V2 itself (no Triton), so
    this is checked on the config: the guard runs in the model's __init__,
    at engine start."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    found = guards.problems(vllm_config)
    assert len(found) == 1 and "VLLM_USE_V2_MODEL_RUNNER=0" in found[0]
    with pytest.raises(guards.UnsupportedSettingError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        guards.check(vllm_config)


def _enum(name: str):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name]


def _kv_connector():
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both")


@pytest.mark.parametrize("changes,named", [
    ({"attention_config.backend": "FLASHINFER"}, "FLASHINFER (--attention-backend)"),
    ({"attention_config.backend": "FLEX_ATTENTION"}, "FLEX_ATTENTION (--attention-backend)"),
    ({"attention_config.backend": "TRITON_FLASHINFER"}, "TRITON_FLASHINFER (--attention-backend)"),
    ({"attention_config.backend": "ROCM_AITER_FA"}, "ROCM_AITER_FA (--attention-backend)"),
    ({"attention_config.backend_per_kind": {"full_attention": "FLASHINFER"}},
     "backend_per_kind['full_attention']"),
    ({"compilation_config.cudagraph_mode": "PIECEWISE", "compilation_config.splitting_ops":
      ["vllm::unified_attention_with_output"]}, "splitting_ops without vllm::unified_kv_cache_update"),
    ({"compilation_config.cudagraph_mode": "PIECEWISE", "compilation_config.splitting_ops": []},
     "splitting_ops without vllm::unified_attention_with_output and vllm::unified_kv_cache_update"),
    ({"compilation_config.use_inductor_graph_partition": True}, "use_inductor_graph_partition=True"),
    ({"kv_transfer_config": "connector"}, "KV connector LMCacheConnectorV1 (--kv-transfer-config"),
], ids=["flashinfer", "flex", "triton-flashinfer", "rocm-aiter-fa", "backend-per-kind",
        "splitting-ops-no-kv-write", "splitting-ops-empty", "inductor-partition", "kv-connector"])
def test_unsupported_engine_setting_is_named(vllm_config, changes, named):
    from vllm.config.compilation import CUDAGraphMode

    config = vllm_config
    for path, value in changes.items():
        if path == "compilation_config.cudagraph_mode":
            value = CUDAGraphMode[value]
        elif path == "attention_config.backend":
            value = _enum(value)
        elif path == "attention_config.backend_per_kind":
            value = {kind: _enum(name) for kind, name in value.items()}
        elif path == "kv_transfer_config":
            value = _kv_connector()
        config = _with(config, path, value)
    found = guards.problems(config)
    assert len(found) == 1 and named in found[0], found


@pytest.mark.parametrize("name", ["FLASH_ATTN", "TRITON_ATTN", "CPU_ATTN"])
def test_allowed_configured_backend_passes(vllm_config, name):
    assert guards.problems(_with(vllm_config, "attention_config.backend", _enum(name))) == []


def test_piecewise_graphs_with_default_splitting_ops_pass(vllm_config):
    """vLLM's resolved default under VLLM_COMPILE + PIECEWISE (GPU)."""
    from vllm.config.compilation import CUDAGraphMode

    config = _with(vllm_config, "compilation_config.cudagraph_mode", CUDAGraphMode.PIECEWISE)
    config = _with(config, "compilation_config.splitting_ops",
                   ["vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"])
    assert guards.problems(config) == []


def test_breakable_cuda_graphs_are_refused(vllm_config, monkeypatch):
    """Read from vllm.envs (set as an attribute: vLLM may cache its envs)."""
    from vllm import envs
    from vllm.config.compilation import CUDAGraphMode

    monkeypatch.setattr(envs, "VLLM_USE_BREAKABLE_CUDAGRAPH", True, raising=False)
    found = guards.problems(_with(vllm_config, "compilation_config.cudagraph_mode", CUDAGraphMode.PIECEWISE))
    assert len(found) == 1 and "VLLM_USE_BREAKABLE_CUDAGRAPH=0" in found[0], found
    assert guards.problems(vllm_config) == []  # no CUDA graphs (CPU): nothing is captured


def _fake_backend(name: str, module: str, qualname: str = "Backend"):
    return type(qualname, (), {"get_name": staticmethod(lambda: name), "__module__": module,
                               "__qualname__": qualname})


def _language_model(*backends):
    from types import SimpleNamespace as NS

    return NS(model=NS(layers=[NS(self_attn=NS(attn=NS(attn_backend=b))) for b in backends]))


def test_selected_attention_backends_allowed():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    guards.check_attention_backends(_language_model(CPUAttentionBackend, FlashAttentionBackend,
                                                    TritonAttentionBackend))


@pytest.mark.parametrize("backend,named", [
    (_fake_backend("FLASHINFER", "vllm.v1.attention.backends.flashinfer", "FlashInferBackend"),
     "FLASHINFER (selected by vLLM)"),
    ("flex", "FLEX_ATTENTION (selected by vLLM)"),
    # ROCm's AITER FlashAttention calls itself FLASH_ATTN: the class decides.
    (_fake_backend("FLASH_ATTN", "vllm.v1.attention.backends.rocm_aiter_fa", "AiterFlashAttentionBackend"),
     "FLASH_ATTN (vllm.v1.attention.backends.rocm_aiter_fa.AiterFlashAttentionBackend)"),
    (None, "decoder layer 1 cannot be read"),
], ids=["flashinfer", "flex", "flash-attn-name-other-class", "unreadable"])
def test_selected_attention_backend_refused(backend, named):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    if backend == "flex":
        from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend as backend
    with pytest.raises(guards.UnsupportedSettingError) as raised:
        guards.check_attention_backends(_language_model(CPUAttentionBackend, backend, backend))
    message = str(raised.value)
    assert named in message, message
    assert message.count(named) == 1  # one message per backend, not per layer
    if backend is not None:
        assert "set --attention-backend FLASH_ATTN or TRITON_ATTN" in message


def _decoder(**attn: object):
    """A language model of two Llama-style layers; the second's attention has `attn`'s attributes."""
    from types import SimpleNamespace as NS

    def layer(**extra):
        return NS(self_attn=NS(qkv_proj=None, rotary_emb=None, attn=NS(sliding_window=extra.pop("window", None)),
                               **extra))

    return NS(model=NS(layers=[layer(), layer(**attn)]))


def test_llama_style_decoder_passes():
    guards.check_text_model(_decoder())  # Llama's and Qwen2's (qk_norm False) attention
    guards.check_text_model(_decoder(qk_norm=False, dual_chunk_attention_config=None))


@pytest.mark.parametrize("attn,named", [
    ({"qk_norm": True, "q_norm": object()}, "decoder layer 1 normalizes q and k"),
    ({"window": 4096}, "decoder layer 1 uses sliding-window attention"),
    ({"dual_chunk_attention_config": {"chunk_size": 8192}}, "decoder layer 1 uses dual-chunk attention"),
], ids=["qk-norm", "sliding-window", "dual-chunk"])
def test_decoder_variants_the_cut_does_not_mirror_are_refused(attn, named):
    """Qwen2's layer variants (QK norm, `use_sliding_window`, dual-chunk
    attention) compute what the cutting step's layer does not: refused."""
    with pytest.raises(guards.UnsupportedSettingError, match=named):
        guards.check_text_model(_decoder(**attn))
