"""Shared fixtures: locally built checkpoints and vLLM engines.

Engines run in vLLM's single-process mode (fast start-up) and are shared
per test module; scripts and servers that need the real multiprocess path
start their own. The tests/test_server_*.py files share one gateway for the
session (tests/server_fixtures.py), stopped after the last test that uses it.
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

# Session-scoped, defined once here: every test_server_*.py file gets the same gateway.
from tests.server_fixtures import SHARED_SERVER, client, offline_texts, scene_url, server  # noqa: E402,F401

_LAST_SERVER_USER = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from feather_vllm.tools.checkpoints import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def onevision_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint's sizes as a LLaVA-OneVision (SigLIP + Qwen2)
    with a 112-pixel tower: an 8 x 8 base view, OneVision's 1x1 to 6x6
    tile grids scaled to it, tile maps above 9 tiles' worth interpolated."""
    from feather_vllm.tools.checkpoints import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-onevision", seed=0,
                            family="llava-onevision", vision_image_size=112)


@pytest.fixture(scope="session")
def next_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint's sizes as a LLaVA-NeXT with a 112-pixel CLIP
    tower: an 8 x 8 base view, tile maps up to 24 x 8 (a 672-pixel NeXT's
    shapes, a third of the side)."""
    from feather_vllm.tools.checkpoints import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-next", seed=0, family="llava-next",
                            vision_image_size=112)


@pytest.fixture(scope="session")
def hf(tiny_checkpoint):
    """(processor, model) of the tiny checkpoint in transformers, fp32: the
    independent reference's model (tests/reference_hf.py)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return processor, model


@pytest.hookimpl(trylast=True)  # after deselection (-k, -m) and any reordering
def pytest_collection_modifyitems(config, items):
    """Notes the last test that uses a `server` fixture (the shared gateway,
    or a module's own of that name: then the shared one is stopped later,
    never earlier than its last use)."""
    users = [item.nodeid for item in items if "server" in getattr(item, "fixturenames", ())]
    config.stash[_LAST_SERVER_USER] = users[-1] if users else ""


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """The shared gateway stops after its last test, not at the end of the
    session: the rest of the suite does not run beside an idle engine."""
    if item.nodeid == item.config.stash.get(_LAST_SERVER_USER, ""):
        shared = item.config.stash.get(SHARED_SERVER, None)
        if shared is not None:
            shared.stop()  # again at the session's end: a no-op then
