"""The vLLM engine behind the gateway: arguments, start-up, layout.

Knows nothing of the gateway's settings or command line (`server.settings`
imports this module, never the reverse): callers pass the values it needs."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feather_vllm import ARCHITECTURE
from feather_vllm.engine import (
    PRUNING_OVERRIDES,
    Override,
    PruningSupport,
    checkpoint_support,
    feather_architecture,
    loaded_support,
    merge_overrides,
)
from feather_vllm.pruning import config as pcfg

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

logger = logging.getLogger("server")

# Engine arguments the gateway itself sets, whatever the flags say.
GATEWAY_OVERRIDES = (
    Override("disable_log_stats", False,
             "the gateway's /metrics shows vLLM's vllm:* metrics next to feather_* (--disable-log-stats is ignored)"),
)
OVERRIDES = PRUNING_OVERRIDES + GATEWAY_OVERRIDES  # what --help and the README list
# vLLM's --shutdown-timeout (0 there: SIGTERM aborts in-flight requests) when the flag is not given: a
# production gateway lets admitted answers finish; 600 s covers the longest answer a 2-core CPU
# generates within a 4k context (and minutes more than a GPU needs). server/app.py `Drain` applies it.
DEFAULT_SHUTDOWN_TIMEOUT_S = 600
# How each override meets the user's own value of that argument.
OVERRIDE_NOTES = {
    "compilation_config": "set only when --compilation-config sets no cudagraph_mode; its other fields are kept",
    "block_size": "on CPU, set only when --block-size is not given",
}


@dataclasses.dataclass(frozen=True)
class EngineLayout:
    """What the gateway needs to know about the running model and engine."""

    image_token_id: int | None  # None: a model without one the gateway knows of (text only, or not LLaVA)
    num_layers: int  # decoder layers: what pruning settings are validated against
    max_model_len: int  # the engine's context length (set, or the model's)
    max_num_seqs: int  # sequences the scheduler runs at once (set, or vLLM's default)
    max_images_per_prompt: int  # the engine's image limit (--limit-mm-per-prompt), at most what the context holds
    # Whether the loaded model prunes (FEATHER's class loaded), read once at start.
    pruning: PruningSupport = PruningSupport(ARCHITECTURE, True)


def _fill_unset_compilation(config: Any, defaults: dict[str, Any]) -> Any:
    """A copy of vLLM's parsed CompilationConfig with the `defaults` fields
    the user left unset (None) filled in; the user's own fields are kept."""
    from vllm.config import CompilationConfig

    wanted = CompilationConfig(**defaults)  # vLLM's own conversion (e.g. "PIECEWISE" -> CUDAGraphMode)
    config = copy.deepcopy(config)  # the parser's default object is shared: never change it
    for key in defaults:
        if getattr(config, key) is None:
            setattr(config, key, getattr(wanted, key))
    return config


def build_engine_args(model: str, default_preset: str, kv_boundaries: list[int] | None,
                      engine_args: AsyncEngineArgs | None = None) -> AsyncEngineArgs:
    """`engine_args` (vLLM's flags as parsed; default: vLLM's defaults for
    `model`) with the overrides: the pruning ones
    (`feather_vllm.engine.merge_overrides`: FEATHER's architecture merged into
    the user's hf_overrides, PIECEWISE CUDA graphs unless the user's
    compilation config sets a mode), the gateway's (`GATEWAY_OVERRIDES`), the
    default preset and KV boundaries (None: the model's default stages), and
    the served name (default: the model directory's name).

    A checkpoint whose architecture has no FEATHER variant
    (`feather_vllm.engine.checkpoint_support`) gets no pruning override: it
    runs vLLM's own model class as `vllm serve` runs it, and a pruning
    --default-preset or --kv-boundaries is refused (ValueError)."""
    from vllm.config import CompilationConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    if engine_args is None:
        engine_args = AsyncEngineArgs(model=model, shutdown_timeout=None)
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE") and engine_args.kv_cache_memory_bytes is not None:
        logger.warning("VLLM_CPU_KVCACHE_SPACE is set: on CPU it overrides --kv-cache-memory-bytes")
    gateway = {"served_model_name": engine_args.served_model_name or [Path(model).name],
               "shutdown_timeout": (DEFAULT_SHUTDOWN_TIMEOUT_S if engine_args.shutdown_timeout is None
                                    else engine_args.shutdown_timeout),
               **{o.name: o.value for o in GATEWAY_OVERRIDES}}
    support = checkpoint_support(engine_args.hf_config_path or engine_args.model, engine_args.hf_overrides,
                                 trust_remote_code=engine_args.trust_remote_code, revision=engine_args.revision,
                                 code_revision=engine_args.code_revision, config_format=engine_args.config_format,
                                 token=engine_args.hf_token)
    if not support.available:
        for flag, given in (("--default-preset", pcfg.resolve(default_preset).enabled),
                            ("--kv-boundaries", kv_boundaries is not None)):
            if given:
                raise ValueError(f"{flag}: {support.unavailable_reason}")
        return dataclasses.replace(engine_args, **gateway)
    hf_overrides = engine_args.hf_overrides
    if callable(hf_overrides):
        raise TypeError("hf_overrides must be a dict for the FEATHER model (got a function)")
    merged = merge_overrides({"hf_overrides": dict(hf_overrides or {}),
                              "compilation_config": engine_args.compilation_config,
                              "block_size": engine_args.block_size}, default_preset,
                             feather_architecture(support.architecture))
    if kv_boundaries is not None:
        merged["hf_overrides"]["feather_kv_boundaries"] = list(kv_boundaries)
    compilation = merged["compilation_config"]
    if isinstance(compilation, CompilationConfig):  # what vLLM's parser makes of --compilation-config
        compilation = _fill_unset_compilation(compilation, PRUNING_OVERRIDES[1].value)
    return dataclasses.replace(engine_args, hf_overrides=merged["hf_overrides"], compilation_config=compilation,
                               block_size=merged["block_size"], **gateway)


def engine_layout(engine: Any) -> EngineLayout:
    """Model and scheduling facts the gateway needs, read from the engine's config."""
    config = engine.vllm_config
    model_config = config.model_config
    hf_config = model_config.hf_config
    mm_config = model_config.multimodal_config
    limit = mm_config.get_limit_per_prompt("image") if mm_config else 0
    pruning = loaded_support(model_config)
    if pruning.available:
        # LLaVA's image tokens: one per patch. More images than the context can
        # hold (vLLM's default limit is 999) are refused before any is fetched.
        vision = hf_config.vision_config
        limit = min(limit, model_config.max_model_len // (vision.image_size // vision.patch_size) ** 2)
    image_token_id = getattr(hf_config, "image_token_index", None)
    return EngineLayout(image_token_id=getattr(hf_config, "image_token_id", None) if image_token_id is None
                        else image_token_id,
                        num_layers=model_config.hf_text_config.num_hidden_layers,
                        max_model_len=model_config.max_model_len,
                        max_num_seqs=config.scheduler_config.max_num_seqs,
                        max_images_per_prompt=limit, pruning=pruning)


def start_engine(engine_args: AsyncEngineArgs):
    """vLLM's async engine, with the defaults of `vllm serve` (its usage context)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
