"""What every check shares: settings, logging, engines, prompts and the
transformers reference model."""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ("unpruned_exact", "kept_sets_reference", "kv_blocks_per_group",
          "benchmark_default_compilation", "flashinfer", "follow_up_turns")
PRUNED = ("fastv", "feather", "pyramiddrop")
MAX_TOKENS = 16  # unpruned_exact: greedy tokens per prompt
LOGPROB_TOL = 1e-4
KV_MAX_TOKENS = 4  # kv_blocks_per_group: 3 generated tokens are in the KV at finish
KV_BLOCK = 32
BENCH_REQUESTS = {"cuda": 9, "cpu": 5}  # per preset, each with an image the engine has not seen
KV_BYTES = 2**30
GPU_MEMORY_UTILIZATION = 0.5  # engines run one after the other in this process
QUESTION = "Where is the red square?"
FOLLOW_UP = "And the blue circle?"
# One preset per policy that takes turn 1's selection: reuse reads compact KV
# in a prefill chunk, add_back adds probes and rows to a step, keep_both cuts again.
FOLLOW_UP_POLICIES = {"feather": "reuse", "fastv": "add_back", "pyramiddrop": "keep_both"}


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def set_environment(device: str) -> None:
    """Before vLLM is imported: offline, single-process engines, V1 runner."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the plugin's hooks live in the V1 runner
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if device == "cpu":
        # The CPU platform lets this override kv_cache_memory_bytes.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        # fp32 exactness checks: Triton's tl.dot would round fp32 inputs to
        # TF32 (vLLM's fp32 attention on GPU is Triton's); torch matmuls
        # already run IEEE fp32 (VLLM_FLOAT32_MATMUL_PRECISION=highest).
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")



class Run:
    """Settings of one check run."""

    def __init__(self, device: str, tmp: Path) -> None:
        self.device = device
        self.tmp = tmp
        self._checkpoints: dict[str, Path] = {}

    def checkpoint(self, profile: str) -> Path:
        if profile not in self._checkpoints:
            from feather_vllm.tools.checkpoints import build_checkpoint

            start = time.perf_counter()
            self._checkpoints[profile] = build_checkpoint(profile, self.tmp / profile, seed=0)
            log(f"built the {profile} checkpoint in {time.perf_counter() - start:.1f} s")
        return self._checkpoints[profile]

    def common(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"kv_cache_bytes": KV_BYTES, "max_model_len": 1024,
                              "distributed_executor_backend": "uni"}
        if self.device == "cuda":
            kw["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
        return kw

    def exact_kwargs(self, stock: bool = False, prefix_caching: bool = False) -> dict[str, Any]:
        """tests/helpers.py make_llm's settings: fp32, eager, no prefix caching
        (unless asked for)."""
        from feather_vllm.engine import engine_kwargs

        kw = engine_kwargs(str(self.checkpoint("tiny")), dtype="float32", max_num_seqs=16, enforce_eager=True,
                           enable_prefix_caching=prefix_caching, block_size=KV_BLOCK, **self.common())
        if stock:
            kw.pop("hf_overrides")
        return kw

    def bench_kwargs(self) -> dict[str, Any]:
        """vLLM's defaults (compilation included) plus the plugin's overrides;
        on cpu eager, fp32 and the tiny checkpoint."""
        from feather_vllm.engine import engine_kwargs

        if self.device == "cuda":
            return engine_kwargs(str(self.checkpoint("bench")), **self.common())
        return engine_kwargs(str(self.checkpoint("tiny")), dtype="float32", enforce_eager=True, **self.common())

    def release(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def new_llm(kwargs: dict[str, Any]):
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(**kwargs)
    log(f"engine ready in {time.perf_counter() - start:.1f} s")
    return llm


def shutdown(llm) -> None:
    """tests/helpers.py shutdown: the process-wide distributed state stays
    for the next single-process engine."""
    llm.llm_engine.engine_core.shutdown()


def model_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()


def attention_backend(llm) -> str | None:
    try:
        layer = model_of(llm).language_model.model.layers[0]
        return layer.self_attn.attn.attn_backend.get_name()
    except Exception:  # noqa: BLE001
        return None


def chat(image, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": text}]}]


def fresh_image(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (336, 336, 3), dtype=np.uint8))


def params(preset: str | dict[str, str] | None, max_tokens: int, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                          extra_args=None if preset is None else {"feather": preset})


def reference_model(ckpt: str | Path) -> tuple[Any, Any]:
    """(processor, fp32 transformers model) of a checkpoint: the independent
    reference's (tests/reference_hf.py)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (AutoProcessor.from_pretrained(ckpt),
            LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval())

