"""Shared fixtures: locally built checkpoints and vLLM engines.

Engines run in vLLM's single-process mode (fast start-up) and are shared
per test module; scripts and servers that need the real multiprocess path
start their own.
"""

from __future__ import annotations

import os

# Before vLLM is imported anywhere: offline, single-process engine. The KV
# budget is set per engine (kv_cache_memory_bytes): the CPU platform lets
# VLLM_CPU_KVCACHE_SPACE override it, so that variable must stay unset here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from feather_vllm.tools.checkpoints import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)
