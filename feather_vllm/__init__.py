"""feather-vllm: FEATHER visual-token pruning inside vLLM's LLaVA prefill."""

ARCHITECTURE = "FeatherLlavaForConditionalGeneration"


def register() -> None:
    """`vllm.general_plugins` entry point: register the model architecture.

    vLLM loads this in every process (API server, engine core, workers), so
    it is also where the KV-cache integration installs its hooks.
    """
    from feather_vllm import compat

    compat.apply_all()

    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "feather_vllm.model:FeatherLlavaForConditionalGeneration")

    from feather_vllm import kv

    kv.install()
