"""Engine settings the integration does not cover are refused at engine
start with the setting named, never run into silent corruption (vLLM
internals, pinned version).

Why each one:
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
"""

from __future__ import annotations

from typing import Any


class UnsupportedSettingError(ValueError):
    """An engine setting FEATHER pruning cannot run under."""


def problems(vllm_config: Any) -> list[str]:
    """Every unsupported setting of `vllm_config`, each naming the setting."""
    from vllm.config.compilation import CUDAGraphMode

    out = []
    if vllm_config.use_v2_model_runner:
        out.append("Model Runner V2 is not supported: set VLLM_USE_V2_MODEL_RUNNER=0")
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode != CUDAGraphMode.NONE and mode.has_full_cudagraphs():
        out.append(f"compilation_config.cudagraph_mode={mode.name} captures attention metadata: "
                   "use PIECEWISE (or NONE)")
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
    return out


def check(vllm_config: Any) -> None:
    """Raise UnsupportedSettingError listing every unsupported setting."""
    found = problems(vllm_config)
    if found:
        raise UnsupportedSettingError("FeatherLlavaForConditionalGeneration: " + "; ".join(found))


def check_text_model(language_model: Any) -> None:
    """The cutting forward mirrors a Llama-style decoder layer."""
    layers = getattr(getattr(language_model, "model", None), "layers", None)
    if layers is None or not all(
        hasattr(layer, "self_attn") and hasattr(layer.self_attn, "qkv_proj")
        and hasattr(layer.self_attn, "rotary_emb") for layer in layers
    ):
        raise UnsupportedSettingError(
            "FeatherLlavaForConditionalGeneration: the text model is not a Llama-style decoder")
