"""Test helpers: deterministic images, prompts and engine construction."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PROMPTS = ["Where is the red square?", "Describe the picture in one word."]


def sample_images() -> list[Image.Image]:
    """Three 336x336 images of different kinds (noise, object, gradient)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)
    scene = np.full((336, 336, 3), 128, dtype=np.uint8)
    scene[40:140, 200:300] = (220, 30, 30)
    ramp = np.linspace(0, 255, 336, dtype=np.uint8)
    gradient = np.stack([np.tile(ramp, (336, 1)), np.tile(ramp[:, None], (1, 336)),
                         np.full((336, 336), 90, np.uint8)], axis=-1)
    return [Image.fromarray(a) for a in (noise, scene, gradient)]


def png_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    """`image` as a data URL (what an OpenAI client sends)."""
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat(image: Image.Image | None, text: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image_pil", "image_pil": image})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def make_llm(checkpoint: Path, stock: bool = False, **kwargs: Any):
    """A single-process vLLM engine on `checkpoint` with the pruning-safe
    settings; `stock=True` keeps vLLM's own LlavaForConditionalGeneration.
    Eager (fast start-up) unless `enforce_eager=False` asks for vLLM's
    compiled mode; prefix caching off (every request computes what a test
    checks) unless asked for. The gateway tests run vLLM's defaults."""
    from vllm import LLM

    from feather_vllm.engine import engine_kwargs

    kwargs.setdefault("kv_cache_bytes", 2**30)
    kwargs.setdefault("enforce_eager", True)
    kwargs.setdefault("enable_prefix_caching", False)
    kwargs.setdefault("distributed_executor_backend", "uni")
    kwargs.setdefault("max_model_len", 1024)
    kwargs.setdefault("max_num_seqs", 16)
    kw = engine_kwargs(str(checkpoint), dtype="float32", **kwargs)
    if stock:
        kw.pop("hf_overrides")
    return LLM(**kw)


def shutdown(llm) -> None:
    """Release an engine. The process-wide distributed state stays: other
    single-process engines in this process keep using it."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def engine_parts(llm) -> tuple[Any, Any, Any]:
    """(scheduler, KV-cache manager, model) of a single-process engine."""
    core = llm.llm_engine.engine_core.engine_core
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    return core.scheduler, core.scheduler.kv_cache_manager, model


def image_prompt(image: Image.Image, text: str) -> dict[str, Any]:
    """A raw LLaVA-1.5 prompt for `LLMEngine.add_request`."""
    return {"prompt": f"<s>USER: <image>\n{text}\nASSISTANT:", "multi_modal_data": {"image": image}}


def blocks_per_group(kv_manager, request_id: str) -> list[int]:
    return [len(m.req_to_blocks.get(request_id, ())) for m in kv_manager.coordinator.single_type_managers]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, *args: str, startup_timeout: float = 180.0, compiled: bool = False,
                 env: dict[str, str] | None = None, max_model_len: int | None = 1024) -> None:
        """Eager engine (fast start-up) unless `compiled`; `env` adds
        environment variables; `max_model_len` None leaves it to the model."""
        import os
        import subprocess
        import sys
        import tempfile
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = {**{k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", str(checkpoint), "--port", str(self.port),
             "--dtype", "float32", "--kv-cache-memory-bytes", "1G",
             *([] if max_model_len is None else ["--max-model-len", str(max_model_len)]),
             *([] if compiled else ["--enforce-eager"]), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        self.saw_503 = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()[-3000:]}")
            try:
                status = httpx.get(self.url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                status = None
            self.saw_503 |= status == 503
            if status == 200:
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in {startup_timeout} s: {self.logs()[-3000:]}")

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
