"""Limits come from the model: with no --max-model-len the gateway serves a
checkpoint whose text model has 1024 positions (vLLM's own derivation),
and answers prompts beyond it with a clear 400."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import ServerProcess, png_data_url, sample_images

MAX_SEQS = 8


@pytest.fixture(scope="module")
def checkpoint_1k(tmp_path_factory):
    from feather_vllm.checkpoints import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny1k", seed=0, max_positions=1024)


def test_engine_kwargs_take_the_models_length(checkpoint_1k):
    from feather_vllm.engine import engine_kwargs

    kwargs = engine_kwargs(str(checkpoint_1k), max_num_seqs=MAX_SEQS)
    # The step budget fits a whole prompt next to every running sequence.
    assert (kwargs["max_model_len"], kwargs["max_num_batched_tokens"]) == (1024, 1024 + MAX_SEQS)
    assert engine_kwargs(str(checkpoint_1k), max_model_len=800)["max_model_len"] == 800


@pytest.fixture(scope="module")
def server(checkpoint_1k):
    proc = ServerProcess(checkpoint_1k, "--served-model-name", "tiny", "--max-num-seqs", str(MAX_SEQS),
                         max_model_len=None)
    yield proc
    proc.stop()


def _chat(text: str, image: bool = True, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(sample_images()[1])}})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def test_serves_with_no_length_flag(server):
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("tiny", 1024)]
    r = httpx.post(server.url + "/v1/chat/completions", json=_chat("Where is the red square?", max_tokens=4,
                                                                   feather={"preset": "feather"}), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4 and r.json()["feather"]["fallback"] is None


@pytest.mark.parametrize("body,param,needle", [
    # vLLM's renderer refuses it (its own check and words).
    (_chat("word " * 600), "messages", "maximum context length is 1024 tokens"),
    (_chat("Where is the red square?", max_tokens=500), "max_tokens", "(1024 - 591 prompt tokens)"),
], ids=["prompt-too-long", "max-tokens-too-many"])
def test_prompts_beyond_the_models_length_get_400(server, body, param, needle):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "context_length_exceeded" and needle in error["message"]


def test_engine_start_failure_exits_nonzero_with_the_error_in_one_line(checkpoint_1k):
    """Asking for more context than the model has: vLLM refuses, the
    gateway exits with code 3 and says why on one log line."""
    with pytest.raises(RuntimeError, match="server exited") as failed:
        ServerProcess(checkpoint_1k, "--served-model-name", "tiny", max_model_len=2048, startup_timeout=120)
    lines = [line for line in str(failed.value).splitlines() if "the engine failed to start:" in line]
    assert len(lines) == 1 and "max_model_len" in lines[0] and "exit code 3" in lines[0], str(failed.value)[-2000:]
