"""FeatherLlavaForConditionalGeneration: vLLM's LLaVA with pruned prefill."""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor,
    info=_build_llava_or_pixtral_hf_info,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FeatherLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose prefill prunes image tokens in stages."""
