"""Workarounds for CPU-only machines, each with its reason.

Nothing here changes behaviour on a regular GPU install of vLLM: each shim
applies only when the condition it works around is present.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def shim_pixtral_image_processor() -> None:
    """Let vLLM's LLaVA module import without torchvision.

    vLLM's `llava.py` imports `pixtral.py`, which imports
    `transformers.models.pixtral.image_processing_pixtral` for one helper;
    that module imports torchvision unconditionally. PyPI's torchvision cannot
    load beside the CPU torch wheel ("operator torchvision::nms does not
    exist"), so the set-up removes it. The PIL implementation of the same
    processor defines the same helper: point the import there.
    """
    name = "transformers.models.pixtral.image_processing_pixtral"
    if name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    pil = importlib.import_module(
        "transformers.models.pixtral.image_processing_pil_pixtral")
    sys.modules[name] = pil


def apply_all() -> None:
    """Apply every shim that the current environment needs."""
    shim_pixtral_image_processor()
