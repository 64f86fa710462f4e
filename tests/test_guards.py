"""Engine settings the integration does not cover are refused at engine
start, each named in the error; never silent corruption."""

from __future__ import annotations

import copy

import pytest

from feather_vllm.kv import guards


@pytest.fixture(scope="module")
def vllm_config(tiny_checkpoint):
    """The engine config the gateway's settings give (nothing refused)."""
    from vllm.engine.arg_utils import EngineArgs

    from feather_vllm.engine import engine_kwargs

    return EngineArgs(**engine_kwargs(str(tiny_checkpoint), dtype="float32", max_model_len=1024,
                                      kv_cache_bytes=2**28)).create_engine_config()


def test_default_settings_pass(vllm_config):
    assert guards.problems(vllm_config) == []
    assert vllm_config.compilation_config.cudagraph_mode.name in ("PIECEWISE", "NONE")


def _with(config, path: str, value):
    """A copy of `config` with one (possibly nested) field replaced."""
    head, _, field = path.rpartition(".")
    out = copy.copy(config)
    target = out
    if head:
        target = copy.copy(getattr(config, head))
        object.__setattr__(out, head, target)
    object.__setattr__(target, field, value)
    return out


@pytest.mark.parametrize("path,value,named", [
    ("parallel_config.pipeline_parallel_size", 2, "--pipeline-parallel-size"),
    ("parallel_config.decode_context_parallel_size", 2, "--decode-context-parallel-size"),
    ("parallel_config.prefill_context_parallel_size", 2, "--prefill-context-parallel-size"),
    ("parallel_config.enable_dbo", True, "--enable-dbo"),
    ("speculative_config", object(), "--speculative-config"),
], ids=["pipeline", "dcp", "pcp", "dbo", "speculative"])
def test_unsupported_setting_is_named(vllm_config, path, value, named):
    found = guards.problems(_with(vllm_config, path, value))
    assert len(found) == 1 and named in found[0]


@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_full_cuda_graphs_are_refused(vllm_config, mode):
    from vllm.config.compilation import CUDAGraphMode

    found = guards.problems(_with(vllm_config, "compilation_config.cudagraph_mode", CUDAGraphMode[mode]))
    assert len(found) == 1 and f"cudagraph_mode={mode}" in found[0]


def test_v2_model_runner_is_refused(vllm_config, monkeypatch):
    """vLLM's GPU default; the CPU build refuses V2 itself (no Triton), so
    this is checked on the config: the guard runs in the model's __init__,
    at engine start."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    found = guards.problems(vllm_config)
    assert len(found) == 1 and "VLLM_USE_V2_MODEL_RUNNER=0" in found[0]
    with pytest.raises(guards.UnsupportedSettingError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        guards.check(vllm_config)
