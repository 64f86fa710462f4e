"""Engine settings that keep pruning exact, shared by every entry point.

The cut must see the whole image and the last prompt token in one step, so
chunked prefill is off, long prompts are never capped, multimodal inputs are
never chunked, and one step's token budget fits a whole prompt for every
sequence (VLLM_NOTES.md, "Scheduling and caching traps"). Anything the
scheduler still splits runs unpruned (see pruning/schedule.py). Prefix
caching is on (vLLM's default): a pruned request reuses the cached text
before its image, and computes and prunes its image itself.

Compilation is vLLM's default (torch.compile; CUDA graphs on GPU) with one
change: PIECEWISE CUDA graphs, which keep attention outside the captured
graphs so that each pruned KV group reads its own metadata in every step
(kv/guards.py refuses full graphs). Cutting prefills run eager by
construction (the model calls its decoder layers one by one).
"""

from __future__ import annotations

from typing import Any

from feather_vllm import ARCHITECTURE


def model_max_len(model: str, hf_overrides: dict[str, Any], overrides: dict[str, Any]) -> int:
    """The context length vLLM derives for `model` when none is set (its own
    rule: positions, rope scaling, sliding window, the tokenizer's limit)."""
    from vllm.engine.arg_utils import EngineArgs

    keys = ("tokenizer", "trust_remote_code", "revision", "code_revision", "tokenizer_revision")
    args = EngineArgs(model=model, hf_overrides=hf_overrides, **{k: overrides[k] for k in keys if k in overrides})
    return args.create_model_config().max_model_len


def engine_kwargs(
    model: str,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    max_num_seqs: int = 64,
    block_size: int | None = None,
    kv_cache_bytes: int | None = None,
    default_preset: str | None = None,
    enable_prefix_caching: bool = True,
    max_images_per_prompt: int = 1,
    seed: int = 0,
    enforce_eager: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` or `AsyncEngineArgs(...)`.

    `max_model_len` None is the model's own (vLLM's derivation from its
    config). `default_preset` becomes the engine-wide pruning default (requests
    without `extra_args["feather"]` use it); None means no pruning.
    `enforce_eager=True` turns compilation and CUDA graphs off (fast
    start-up for tests); the default compiles as vLLM does.
    """
    hf_overrides: dict[str, Any] = {"architectures": [ARCHITECTURE]}
    if default_preset is not None:
        hf_overrides["feather_default"] = default_preset
    if max_model_len is None:
        max_model_len = model_max_len(model, hf_overrides, overrides)
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        hf_overrides=hf_overrides,
        enable_chunked_prefill=False,
        long_prefill_token_threshold=0,
        disable_chunked_mm_input=True,
        max_num_batched_tokens=max_model_len + max_num_seqs,
        enable_prefix_caching=enable_prefix_caching,
        limit_mm_per_prompt={"image": max_images_per_prompt},
        enforce_eager=enforce_eager,
        compilation_config={"cudagraph_mode": "PIECEWISE"},
    )
    if block_size is not None:
        kwargs["block_size"] = block_size
    if kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    kwargs.update(overrides)
    return kwargs
