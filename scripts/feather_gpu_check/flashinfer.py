"""Check 5: an engine asking for FlashInfer is refused at start."""

from __future__ import annotations

from typing import Any

from feather_gpu_check.common import Run, attention_backend, new_llm, shutdown


def flashinfer(run: Run) -> dict[str, Any]:
    kw = {**run.bench_kwargs(), "attention_backend": "FLASHINFER"}
    message = None
    try:
        llm = new_llm(kw)
    except Exception as exc:  # noqa: BLE001
        messages, seen = [], exc
        while seen is not None and len(messages) < 5:  # the guard's error may be a cause
            messages.append(f"{type(seen).__name__}: {seen}")
            seen = seen.__cause__ or seen.__context__
        message = " <- ".join(messages)
    if message is not None:
        run.release()  # the half-built engine, now that the exception is gone
        by_plugin = "UnsupportedSettingError" in message and "FeatherLlavaForConditionalGeneration" in message
        names_flashinfer = "flashinfer" in message.lower()
        ok = by_plugin and names_flashinfer
        return {"ok": ok, "refused": True, "refused_by_plugin_guard": by_plugin,
                "names_flashinfer": names_flashinfer, "message": message[:1000],
                "error": None if ok else "refused, but not by the plugin's guard naming FlashInfer"}
    try:
        backend = attention_backend(llm)
    finally:
        shutdown(llm)
        del llm
        run.release()
    return {"ok": False, "refused": False, "refused_by_plugin_guard": False, "names_flashinfer": False,
            "message": None, "error": f"the engine started with attention_backend=FLASHINFER (layer backend {backend})"}
