"""Kept tokens travel from the worker to the scheduler on the step's
runner output: through vLLM's async-scheduling wrapper and through the
pickling of the multi-process executors. (Signatures and attributes of
every vLLM internal the plugin touches: tests/test_seams.py.)"""

from __future__ import annotations

import pickle

from feather_vllm.kv.plan import KeptTokens, StageKept
from feather_vllm.kv.runner_v1 import attach_kept


def test_async_runner_output_returns_the_wrapped_output():
    """With async scheduling the kept tokens ride the ModelRunnerOutput that
    AsyncGPUModelRunnerOutput.get_output() returns."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

    inner = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    wrapped = object.__new__(AsyncGPUModelRunnerOutput)  # its __init__ needs CUDA streams
    wrapped._model_runner_output = inner
    kept = {"a": KeptTokens((StageKept(3, ((1, 2),)),), life=1)}
    assert attach_kept(wrapped, kept) and inner.feather_kept == kept
    assert not attach_kept(EMPTY_MODEL_RUNNER_OUTPUT, kept) and not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, "feather_kept")
    assert not attach_kept(None, kept)


def test_kept_tokens_survive_pickling():
    """ModelRunnerOutput keeps extra attributes through pickling (the
    multi-process executors)."""
    from vllm.v1.outputs import ModelRunnerOutput

    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    out.feather_kept = {"a": KeptTokens((StageKept(3, ((0, 5), (1,))),), life=2)}
    assert pickle.loads(pickle.dumps(out)).feather_kept == out.feather_kept
