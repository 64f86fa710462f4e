"""Engine settings the integration does not cover are refused at engine
start with the setting named, never run into silent corruption (vLLM
internals, pinned version).

The integration builds attention metadata several times per step on the
same builder (one build per pruned KV group or cut, each from a shallow
copy of vLLM's CommonAttentionMetadata) and gives pruned layers their own
per-layer slot mappings in the forward context. Why each one is refused:
- Model Runner V2 (`VLLM_USE_V2_MODEL_RUNNER`, vLLM's GPU default): the
  runner hooks live in the V1 runner; under V2 the KV managers would still
  reserve compacted blocks while full-length KV is written.
- Full CUDA graphs (`cudagraph_mode` FULL / FULL_AND_PIECEWISE, vLLM's GPU
  default): a captured attention kernel reads the metadata buffers of the
  capture, not a pruned group's own. PIECEWISE keeps attention outside the
  graphs (and everything else in them); `feather_vllm.engine.engine_kwargs`
  sets it.
- Micro-batching (DBO), decode and prefill context parallelism, pipeline
  parallelism and speculative decoding: metadata is split or rebuilt where the hooks do
  not see it.
- Attention backends not in `ALLOWED_BACKENDS` (configured, or selected per
  layer: `check_attention_backends`): FlashInfer re-plans one wrapper per
  builder, FlexAttention keeps per-builder buffers and cached fields; the
  others are not verified.
- Breakable CUDA graphs (`VLLM_USE_BREAKABLE_CUDAGRAPH=1`): the KV-cache write
  is captured with the capture's slots.
- `splitting_ops` lacking the KV-cache write or attention op (piecewise CUDA
  graphs), inductor graph partition: that op is captured likewise.
- KV connectors (`kv_transfer_config`, `--kv-offloading-size`): they move KV
  by block ids and token positions, which pruned groups compact.
"""

from __future__ import annotations

from typing import Any


class UnsupportedSettingError(ValueError):
    """An engine setting FEATHER pruning cannot run under."""


# Backends whose metadata builder keeps no state across the builds of a step
# (read in vLLM 0.32's source), by name and class path: ROCm's AITER
# FlashAttention backend also calls itself FLASH_ATTN.
ALLOWED_BACKENDS = {
    "FLASH_ATTN": "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend",
    "TRITON_ATTN": "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend",
    "ROCM_ATTN": "vllm.v1.attention.backends.rocm_attn.RocmAttentionBackend",
    "ROCM_AITER_UNIFIED_ATTN":
        "vllm.v1.attention.backends.rocm_aiter_unified_attn.RocmAiterUnifiedAttentionBackend",
    "CPU_ATTN": "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend",
}
_REFUSED_BECAUSE = {
    "FLASHINFER": "one planned wrapper per builder: a second metadata build in a step re-plans it "
                  "for every layer",
    "TRITON_FLASHINFER": "routes causal batches to FlashInfer (one planned wrapper per builder)",
    "FLEX_ATTENTION": "persistent per-builder buffers and cached CommonAttentionMetadata fields: "
                      "the last metadata build of a step wins",
}
_USE_INSTEAD = "set --attention-backend FLASH_ATTN or TRITON_ATTN"
KV_CACHE_UPDATE_OP = "vllm::unified_kv_cache_update"
ATTENTION_OP = "vllm::unified_attention_with_output"


def _backend_problem(name: str, path: str, where: str) -> str | None:
    """Why backend `name` (class path `path`) is refused, or None."""
    if ALLOWED_BACKENDS.get(name) == path:
        return None
    reason = _REFUSED_BECAUSE.get(name, "not verified with several metadata builds per step")
    shown = f"{name} ({path})" if name in ALLOWED_BACKENDS else name
    return f"attention backend {shown} ({where}) is not supported ({reason}): {_USE_INSTEAD}"


def _configured_backend_problems(attention_config: Any) -> list[str]:
    out = []
    configured = [("--attention-backend", attention_config.backend)]
    configured += [(f"attention_config.backend_per_kind[{kind!r}]", backend)
                   for kind, backend in (getattr(attention_config, "backend_per_kind", None) or {}).items()]
    for where, backend in configured:
        if backend is None:
            continue
        try:
            path = backend.get_path()
        except ValueError:  # a CUSTOM backend never registered: vLLM refuses it itself
            path = ""
        problem = _backend_problem(backend.name, path, where)
        if problem is not None:
            out.append(problem)
    return out


def problems(vllm_config: Any) -> list[str]:
    """Every unsupported setting of `vllm_config`, each naming the setting."""
    from vllm import envs
    from vllm.config.compilation import CUDAGraphMode

    out = []
    if vllm_config.use_v2_model_runner:
        out.append("Model Runner V2 is not supported: set VLLM_USE_V2_MODEL_RUNNER=0")
    compilation = vllm_config.compilation_config
    mode = compilation.cudagraph_mode
    graphs = mode is not None and mode != CUDAGraphMode.NONE
    if graphs and mode.has_full_cudagraphs():
        out.append(f"compilation_config.cudagraph_mode={mode.name} captures attention metadata: "
                   "use PIECEWISE (or NONE)")
    breakable = graphs and envs.VLLM_USE_BREAKABLE_CUDAGRAPH
    if breakable:
        out.append("VLLM_USE_BREAKABLE_CUDAGRAPH=1 captures the KV-cache write with the slots of "
                   "the capture: set VLLM_USE_BREAKABLE_CUDAGRAPH=0 (vLLM turns it on for some "
                   "models and for VLLM_BATCH_INVARIANT)")
    if compilation.use_inductor_graph_partition:
        out.append("compilation_config.use_inductor_graph_partition=True splits CUDA graphs only at "
                   "splitting_ops, whose default then lacks the KV-cache write: set it to False")
    elif graphs and not breakable and not mode.has_full_cudagraphs():  # PIECEWISE
        splitting = compilation.splitting_ops or []
        missing = [op for op in (ATTENTION_OP, KV_CACHE_UPDATE_OP) if op not in splitting]
        if missing:
            out.append(f"compilation_config.splitting_ops without {' and '.join(missing)} puts "
                       f"{'them' if len(missing) > 1 else 'it'} in the piecewise CUDA graphs, replayed "
                       "with the slots and metadata of the capture: leave splitting_ops unset "
                       "(vLLM's default splits at both)")
    out += _configured_backend_problems(vllm_config.attention_config)
    parallel = vllm_config.parallel_config
    if parallel.use_ubatching:
        out.append("micro-batching (--enable-dbo / ubatch_size) is not supported")
    if parallel.decode_context_parallel_size > 1:
        out.append("decode context parallelism (--decode-context-parallel-size > 1) is not supported")
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        out.append("prefill context parallelism (--prefill-context-parallel-size > 1) is not supported")
    if parallel.pipeline_parallel_size > 1:
        out.append("pipeline parallelism (--pipeline-parallel-size > 1) is not supported")
    if vllm_config.speculative_config is not None:
        out.append("speculative decoding (--speculative-config) is not supported")
    kv_transfer = vllm_config.kv_transfer_config
    if kv_transfer is not None and kv_transfer.kv_connector is not None:
        out.append(f"KV connector {kv_transfer.kv_connector} (--kv-transfer-config, or "
                   "--kv-offloading-size) is not supported (it moves KV by vLLM's block ids and "
                   "token positions, which pruned KV groups compact): remove it")
    return out


def check(vllm_config: Any) -> None:
    """Raise UnsupportedSettingError listing every unsupported setting."""
    found = problems(vllm_config)
    if found:
        raise UnsupportedSettingError("FeatherLlavaForConditionalGeneration: " + "; ".join(found))


def check_text_model(language_model: Any) -> None:
    """The cutting forward mirrors a Llama-style decoder layer: input norm,
    QKV projection, RoPE, full attention, output projection, norm, MLP.
    Variants of that layer it does not mirror are refused: QK norms (some
    Qwen2 derivatives), sliding-window attention (Qwen2's
    `use_sliding_window`) and dual-chunk attention."""
    layers = getattr(getattr(language_model, "model", None), "layers", None)
    if layers is None or not all(
        hasattr(layer, "self_attn") and hasattr(layer.self_attn, "qkv_proj")
        and hasattr(layer.self_attn, "rotary_emb") for layer in layers
    ):
        raise UnsupportedSettingError("FEATHER's model class: the text model is not a Llama-style decoder")
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if getattr(attn, "qk_norm", False) or hasattr(attn, "q_norm"):
            raise UnsupportedSettingError(f"FEATHER's model class: decoder layer {i} normalizes q and k "
                                          "(QK norm), which the cutting step does not apply")
        if getattr(getattr(attn, "attn", None), "sliding_window", None) is not None:
            raise UnsupportedSettingError(f"FEATHER's model class: decoder layer {i} uses sliding-window "
                                          "attention; FEATHER's KV stages hold full attention only")
        if getattr(attn, "dual_chunk_attention_config", None):
            raise UnsupportedSettingError(f"FEATHER's model class: decoder layer {i} uses dual-chunk attention")


def check_attention_backends(language_model: Any) -> None:
    """Every decoder layer's selected attention backend (chosen per layer
    when vLLM builds its `Attention`) is in `ALLOWED_BACKENDS`, by name and
    class. Call after check_text_model."""
    found: dict[str, str] = {}
    for i, layer in enumerate(language_model.model.layers):
        backend = getattr(getattr(layer.self_attn, "attn", None), "attn_backend", None)
        if backend is None:
            found.setdefault("?", f"the attention backend of decoder layer {i} cannot be read "
                                  "(vLLM version not supported)")
            continue
        name = backend.get_name()
        problem = _backend_problem(name, f"{backend.__module__}.{backend.__qualname__}", "selected by vLLM")
        if problem is not None:
            found.setdefault(name, problem)
    if found:
        raise UnsupportedSettingError("FeatherLlavaForConditionalGeneration: " + "; ".join(found.values()))
