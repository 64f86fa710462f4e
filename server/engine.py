"""The vLLM engine behind the gateway: arguments, start-up, layout."""

from __future__ import annotations

import dataclasses
from typing import Any

from feather_vllm.engine import engine_kwargs
from server.settings import Settings


@dataclasses.dataclass(frozen=True)
class EngineLayout:
    """What the gateway needs to know about the running model."""

    image_token_id: int
    num_layers: int  # decoder layers: what pruning settings are validated against
    max_model_len: int  # the engine's context length (set, or the model's)


def build_engine_args(settings: Settings):
    """AsyncEngineArgs for the FEATHER model with pruning-safe scheduling."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = engine_kwargs(
        settings.model,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        block_size=settings.block_size,
        kv_cache_bytes=int(settings.kv_cache_gib * 2**30),
        default_preset=settings.default_preset,
        max_images_per_prompt=settings.max_images_per_request,
        enforce_eager=settings.enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        tensor_parallel_size=settings.tensor_parallel_size,
    )
    if settings.kv_boundaries is not None:
        kwargs["hf_overrides"]["feather_kv_boundaries"] = settings.kv_boundaries
    return AsyncEngineArgs(
        **kwargs,
        served_model_name=[settings.model_name],
        disable_log_stats=False,  # vLLM's own vllm:* metrics for /metrics
    )


def engine_layout(engine: Any) -> EngineLayout:
    """Model facts the pruning report needs, read from the engine's config."""
    model_config = engine.vllm_config.model_config
    hf_config = model_config.hf_config
    return EngineLayout(image_token_id=hf_config.image_token_index,
                        num_layers=hf_config.text_config.num_hidden_layers,
                        max_model_len=model_config.max_model_len)


def start_engine(settings: Settings):
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(build_engine_args(settings))
