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
    from feather_vllm.tools.checkpoints import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny1k", seed=0, max_positions=1024)


def test_engine_args_leave_the_length_to_vllm(checkpoint_1k):
    """No --max-model-len: the gateway leaves it (and the step budget) unset
    and vLLM derives the model's own length; a length given is kept."""
    from server.settings import parse_args

    args = parse_args(["--model", str(checkpoint_1k), "--max-num-seqs", str(MAX_SEQS)]).engine_args
    assert args.max_model_len is None and args.max_num_batched_tokens is None
    assert args.create_model_config().max_model_len == 1024
    shorter = parse_args(["--model", str(checkpoint_1k), "--max-model-len", "800"]).engine_args
    assert shorter.create_model_config().max_model_len == 800


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


def test_more_images_than_the_context_holds_get_400(server):
    """vLLM's default image limit (999) is capped by the context: 1024
    positions hold one 576-token image; a second is refused before any fetch."""
    body = _chat("Where is the red square?", max_tokens=4)
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}})
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_images" and "at most 1" in error["message"]


def test_engine_start_failure_exits_nonzero_with_the_error_in_one_line(checkpoint_1k):
    """Asking for more context than the model has: vLLM refuses, the
    gateway exits with code 3 and says why on one log line."""
    with pytest.raises(RuntimeError, match="server exited") as failed:
        ServerProcess(checkpoint_1k, "--served-model-name", "tiny", max_model_len=2048, startup_timeout=120)
    lines = [line for line in str(failed.value).splitlines() if "the engine failed to start:" in line]
    assert len(lines) == 1 and "max_model_len" in lines[0] and "exit code 3" in lines[0], str(failed.value)[-2000:]
