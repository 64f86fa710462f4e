"""Architectures without a FEATHER variant are served as vLLM serves them:
no pruning override (vLLM's own model class), the greedy tokens of vLLM's
offline engine, one start-up log line naming the architecture, and
requests with pruning settings refused with 400 naming it. The checkpoint
is a random-weight text-only Llama built here
(feather_vllm/tools/stock_checkpoints.py)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from feather_vllm.tools.stock_checkpoints import build_stock_checkpoint
from tests.helpers import ServerProcess, png_data_url, sample_images

# arch flag -> (the checkpoint's architecture, whether a chat carries an image)
MODELS = {"llama": ("LlamaForCausalLM", False)}
QUESTION = "Where is the red square?"
MAX_TOKENS = 8
CONTEXT = 512


def _messages(with_image: bool) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": QUESTION}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(sample_images()[1])}})
    return [{"role": "user", "content": content}]


def _offline_greedy(checkpoint: Path, with_image: bool) -> tuple[str, list[str]]:
    """(text, token strings) of vLLM's own offline engine, no plugin
    arguments: what `vllm serve` would answer."""
    from vllm import LLM, SamplingParams

    from tests.helpers import chat, shutdown

    llm = LLM(model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=CONTEXT,
              kv_cache_memory_bytes=2**30, distributed_executor_backend="uni")
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
        output = llm.chat(chat(sample_images()[1] if with_image else None, QUESTION), params,
                          use_tqdm=False)[0].outputs[0]
        tokens = [step[token].decoded_token for step, token in zip(output.logprobs, output.token_ids)]
        return output.text, tokens
    finally:
        shutdown(llm)


@dataclasses.dataclass(frozen=True)
class Stock:
    """One model: its checkpoint, vLLM's offline greedy answer, and the gateway on it."""

    arch: str
    architecture: str
    with_image: bool
    checkpoint: Path
    text: str
    tokens: list[str]
    server: ServerProcess


@pytest.fixture(scope="module")
def stocks(tmp_path_factory) -> dict[str, Stock]:
    """The gateways start at once (in threads) while vLLM's offline engine
    answers in this process: engine starts are the cost here."""
    checkpoints = {arch: build_stock_checkpoint(arch, tmp_path_factory.mktemp("stock") / arch) for arch in MODELS}
    with ThreadPoolExecutor(len(MODELS)) as pool:
        starting = {arch: pool.submit(ServerProcess, path, "--served-model-name", arch, max_model_len=CONTEXT)
                    for arch, path in checkpoints.items()}
        try:
            answers = {arch: _offline_greedy(path, MODELS[arch][1]) for arch, path in checkpoints.items()}
            servers = {arch: future.result() for arch, future in starting.items()}
        except BaseException:
            for future in starting.values():
                if future.exception() is None:
                    future.result().stop()
            raise
    yield {arch: Stock(arch, *MODELS[arch], checkpoints[arch], *answers[arch], servers[arch]) for arch in MODELS}
    for server in servers.values():
        server.proc.terminate()  # both drain at once
    for server in servers.values():
        server.stop()


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def stock(request, stocks) -> Stock:
    return stocks[request.param]


def _chat(stock: Stock, **extra: Any) -> httpx.Response:
    body = {"model": stock.arch, "messages": _messages(stock.with_image), "max_tokens": MAX_TOKENS,
            "temperature": 0, **extra}
    return httpx.post(stock.server.url + "/v1/chat/completions", json=body, timeout=120)


def test_models_lists_the_served_name(stock):
    r = httpx.get(stock.server.url + "/v1/models", timeout=30)
    assert r.status_code == 200
    assert [(m["id"], m["max_model_len"]) for m in r.json()["data"]] == [(stock.arch, CONTEXT)]


@pytest.mark.parametrize("feather", [None, {"preset": "none"}, {"stages": []}], ids=["absent", "none", "no-stages"])
def test_chat_gives_vllms_own_greedy_tokens(stock, feather):
    r = _chat(stock, logprobs=True, **({} if feather is None else {"feather": feather}))
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == stock.text
    assert [entry["token"] for entry in choice["logprobs"]["content"]] == stock.tokens
    assert body["usage"]["completion_tokens"] == len(stock.tokens)
    assert body.get("feather") is None  # no pruning report: vLLM's own model ran


@pytest.mark.parametrize("feather", [{"preset": "feather"}, {"preset": "fastv", "return_kept": True},
                                     {"stages": [{"layer": 1, "keep": 0.5}]}],
                         ids=["feather", "fastv", "custom-stages"])
def test_pruning_settings_get_400_naming_the_architecture(stock, feather):
    r = _chat(stock, feather=feather)
    assert r.status_code == 400, r.text
    assert r.json() == {"error": {
        "message": f"feather: pruning is unavailable for {stock.architecture}: FEATHER prunes "
                   "LlavaForConditionalGeneration, LlavaNextForConditionalGeneration and "
                   "LlavaOnevisionForConditionalGeneration checkpoints only; "
                   "this server runs the model unpruned "
                   "(send no feather settings, or preset 'none')",
        "type": "invalid_request_error", "param": "feather", "code": "pruning_unavailable"}}
    assert _chat(stock).status_code == 200  # still serving


def test_one_startup_line_names_the_architecture(stock):
    lines = [line for line in stock.server.logs().splitlines() if "pruning is unavailable" in line]
    assert len(lines) == 1, lines
    assert f"pruning is unavailable for {stock.architecture}: " in lines[0]
    assert f"Resolved architecture: {stock.architecture}" in stock.server.logs()  # vLLM's own class


def test_engine_args_are_vllms_with_no_pruning_override(stock, monkeypatch):
    """What `python -m server` starts: vLLM's defaults for the checkpoint
    (only the gateway's own overrides), and a pruning default refused."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from server.settings import parse_args

    monkeypatch.delenv("FEATHER_MODEL", raising=False)
    model = str(stock.checkpoint)
    ours = parse_args(["--model", model]).engine_args
    vllms = AsyncEngineArgs.from_cli_args(AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
                                          .parse_args(["--model", model]))
    for field in ("hf_overrides", "compilation_config", "block_size"):
        assert getattr(ours, field) == getattr(vllms, field), field


@pytest.mark.parametrize("flags,named", [(["--default-preset", "feather"], "--default-preset"),
                                         (["--kv-boundaries", "1"], "--kv-boundaries")],
                         ids=["default-preset", "kv-boundaries"])
def test_pruning_flags_are_usage_errors(stock, monkeypatch, capsys, flags, named):
    from server.settings import parse_args

    monkeypatch.delenv("FEATHER_MODEL", raising=False)
    with pytest.raises(SystemExit) as exited:
        parse_args(["--model", str(stock.checkpoint), *flags])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert f"ValueError: {named}: pruning is unavailable for {stock.architecture}: " in err, err
