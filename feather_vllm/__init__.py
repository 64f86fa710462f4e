"""feather-vllm: FEATHER visual-token pruning inside vLLM's LLaVA prefill."""

ARCHITECTURE = "FeatherLlavaForConditionalGeneration"  # LLaVA-1.5's, the first
# vLLM's architecture -> FEATHER's variant of it (a class in feather_vllm.model).
ARCHITECTURES = {
    "LlavaForConditionalGeneration": ARCHITECTURE,
    "LlavaNextForConditionalGeneration": "FeatherLlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "FeatherLlavaOnevisionForConditionalGeneration",
}


def register() -> None:
    """`vllm.general_plugins` entry point: register the model architectures.

    vLLM loads this in every process (API server, engine core, workers), so
    it is also where the KV-cache integration installs its hooks. vLLM does
    not guard the call, so this never raises: outside the supported vLLM
    range (`feather_vllm.kv.seams`), or on any error, it logs one warning,
    registers nothing, and vLLM runs unchanged.
    """
    import logging

    try:
        from feather_vllm import compat

        compat.apply_all()  # harmless on any install: each shim checks its condition
        from feather_vllm.kv import seams

        refusal = seams.refusal()
        if refusal is None:
            from feather_vllm import kv

            kv.install()  # inert until an architecture below is loaded
            from vllm import ModelRegistry

            for feather in ARCHITECTURES.values():
                if feather not in ModelRegistry.get_supported_archs():
                    ModelRegistry.register_model(feather, f"feather_vllm.model:{feather}")
            return
    except Exception as exc:  # noqa: BLE001 - never break vLLM for every model
        import sys

        try:
            version = str(sys.modules["vllm"].__version__)
        except Exception:  # noqa: BLE001
            version = "(version unknown)"
        refusal = (f"feather_vllm could not check or install its integration with vLLM {version} "
                   f"({type(exc).__name__}: {exc}): FEATHER pruning is not registered "
                   "(vLLM itself runs unchanged)")
    logging.getLogger("feather_vllm").warning("%s", refusal)
