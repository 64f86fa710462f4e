"""Engine arguments for the FEATHER model, shared by every entry point.

Everything a caller does not set is vLLM's own default (chunked prefill,
its token budget, prefix caching, the context length derived from the
model, multimodal limits). Pruning needs exactly the overrides listed in
`PRUNING_OVERRIDES`, each with its reason; the gateway prints them in
`--help` and the README lists them.

Chunked prefill stays on: the scheduler hook (kv/scheduler_hook.py) ends a
pruned request's chunk before its first image when the image and the rest
of the prompt do not fit in the step, so the cut sees every image token and
the last prompt token in one forward pass; a request whose image and tail
alone exceed the step budget runs unpruned (`prompt_split`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from feather_vllm import ARCHITECTURE, ARCHITECTURES


@dataclasses.dataclass(frozen=True)
class Override:
    """An engine argument pruning sets differently from vLLM's default."""

    name: str  # vllm.engine.arg_utils.EngineArgs field
    value: Any
    reason: str


PRUNING_OVERRIDES = (
    Override("hf_overrides", {"architectures": [ARCHITECTURE]},
             f"load the checkpoint as FEATHER's variant of its vLLM class ({', '.join(ARCHITECTURES.values())}): "
             "vLLM's model with a pruned prefill; merged into any --hf-overrides given"),
    Override("compilation_config", {"cudagraph_mode": "PIECEWISE"},
             "attention runs outside captured CUDA graphs, so each pruned KV group reads its own "
             "metadata every step (full graphs are refused at start)"),
    Override("block_size", 32,
             "CPU only, when --block-size is not given (GPUs keep vLLM's default, 16): KV is held in "
             "whole blocks, and vLLM's CPU default of 128 tokens rounds a pruned stage's ~270 tokens "
             "up to 384 (feather 0.50x of unpruned instead of 0.44x); the CPU attention kernel's fast "
             "path takes any multiple of 32"),
)
CPU_BLOCK_SIZE = PRUNING_OVERRIDES[2]

# Checkpoint architectures FEATHER has a pruning variant of (each FEATHER
# class subclasses vLLM's), or FEATHER's own names (an --hf-overrides that
# already asks for one). Any other is served as vLLM serves it.
PRUNABLE_ARCHITECTURES = (*ARCHITECTURES, *ARCHITECTURES.values())


def feather_architecture(architecture: str) -> str:
    """FEATHER's variant of a prunable checkpoint architecture."""
    return ARCHITECTURES.get(architecture, architecture)


@dataclasses.dataclass(frozen=True)
class PruningSupport:
    """Whether a served model can prune, decided once at start: from its
    checkpoint's architecture (`checkpoint_support`) before the engine is
    built, then recorded from the architecture the engine loaded."""

    architecture: str  # the first of the config's `architectures`, after the user's hf_overrides
    available: bool

    @property
    def unavailable_reason(self) -> str:
        """Why pruning settings are refused for this model (one line)."""
        *others, last = ARCHITECTURES
        return (f"pruning is unavailable for {self.architecture}: FEATHER prunes "
                f"{', '.join(others)} and {last} checkpoints only")


def checkpoint_support(model: str, hf_overrides: Any = None, **config_kwargs: Any) -> PruningSupport:
    """`PruningSupport` of the checkpoint `model`, read with vLLM's own
    config loader (`vllm.transformers_utils.config.get_config`;
    `config_kwargs` are its trust_remote_code, revision, config_format,
    token...) with `hf_overrides` (a dict or a function, as vLLM takes it)
    applied; a dict's nested values (sub-config overrides) cannot rename
    the architecture and are left out, as vLLM applies them later."""
    from vllm.transformers_utils.config import get_config

    config_kwargs.setdefault("trust_remote_code", False)
    flat = ({k: v for k, v in hf_overrides.items() if not isinstance(v, dict)}
            if isinstance(hf_overrides, dict) else None)
    config = get_config(model, hf_overrides_kw=flat, hf_overrides_fn=hf_overrides if callable(hf_overrides) else None,
                        **config_kwargs)
    architectures = list(getattr(config, "architectures", None) or ())
    architecture = architectures[0] if architectures else str(getattr(config, "model_type", "unknown"))
    return PruningSupport(architecture, architecture in PRUNABLE_ARCHITECTURES)


def loaded_support(model_config: Any) -> PruningSupport:
    """`PruningSupport` of a running engine (its vLLM `ModelConfig`):
    pruning is available exactly when FEATHER's model class was loaded."""
    return PruningSupport(model_config.architectures[0], model_config.architecture in ARCHITECTURES.values())


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def merge_overrides(kwargs: dict[str, Any], default_preset: str | None = None,
                    architecture: str = ARCHITECTURE) -> dict[str, Any]:
    """`kwargs` (EngineArgs fields a caller set) with the pruning overrides
    merged in: the architecture is FEATHER's `architecture` (the variant of
    the checkpoint's, `feather_architecture`); a compilation config the
    caller gave keeps its other fields. `default_preset` becomes the
    engine-wide pruning default (requests without `extra_args["feather"]`
    use it); None means no pruning."""
    out = dict(kwargs)
    hf_overrides = {**(out.get("hf_overrides") or {}), "architectures": [architecture]}
    if default_preset is not None:
        hf_overrides["feather_default"] = default_preset
    out["hf_overrides"] = hf_overrides
    compilation = out.get("compilation_config")
    if compilation is None:
        out["compilation_config"] = dict(PRUNING_OVERRIDES[1].value)
    elif isinstance(compilation, dict):
        out["compilation_config"] = {**PRUNING_OVERRIDES[1].value, **compilation}
    if out.get("block_size") is None and _on_cpu():
        out["block_size"] = CPU_BLOCK_SIZE.value
    return out


def engine_kwargs(model: str, *, default_preset: str | None = None, kv_cache_bytes: int | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` or `AsyncEngineArgs(...)`: the
    FEATHER model on `model` with vLLM's defaults, the pruning overrides and
    what the caller sets (`kwargs`, EngineArgs names; `kv_cache_bytes` is
    `kv_cache_memory_bytes`)."""
    if kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    support = checkpoint_support(model, kwargs.get("hf_overrides"))
    return merge_overrides({"model": model, **kwargs}, default_preset, feather_architecture(support.architecture))
