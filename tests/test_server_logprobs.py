"""Logprobs that JSON cannot carry (-inf, NaN) are clamped to vLLM's floor
(-9999.0), in plain answers and streams alike, top_logprobs included.

No engine: the conversion is called directly, and the app is driven in-process
(ASGI, no lifespan) with a stand-in engine whose outputs carry such logprobs."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from vllm.logprobs import Logprob

from server.app import create_app
from server.engine import EngineLayout
from server.logprobs import LOGPROB_FLOOR, chat_logprobs, clamp_logprob
from server.settings import Settings

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(("value", "expected"), [
    (-INF, -9999.0), (NAN, -9999.0), (-1e6, -9999.0), (-9999.0, -9999.0), (-9998.5, -9998.5),
    (-0.25, -0.25), (0.0, 0.0),
], ids=["-inf", "nan", "below-floor", "floor", "above-floor", "finite", "zero"])
def test_clamp_logprob_floors_like_vllm(value, expected):
    assert LOGPROB_FLOOR == -9999.0  # vLLM's ChatCompletionLogProb default and floor
    assert clamp_logprob(value) == expected


def _steps() -> tuple[list[int], list[dict[int, Logprob]]]:
    """Two sampled tokens (5, then 6) with their candidates: -inf and NaN
    both as the sampled token's logprob and among the top candidates."""
    return [5, 6], [
        {5: Logprob(-INF, rank=2, decoded_token="a"), 7: Logprob(-0.5, rank=1, decoded_token="b"),
         8: Logprob(NAN, rank=3, decoded_token="c")},
        {6: Logprob(NAN, rank=1, decoded_token=None), 9: Logprob(-INF, rank=2, decoded_token="e")},
    ]


EXPECTED = {"content": [
    {"token": "a", "logprob": -9999.0, "bytes": [97],
     "top_logprobs": [{"token": "b", "logprob": -0.5, "bytes": [98]},
                      {"token": "a", "logprob": -9999.0, "bytes": [97]}]},
    {"token": "d", "logprob": -9999.0, "bytes": [100],
     "top_logprobs": [{"token": "d", "logprob": -9999.0, "bytes": [100]},
                      {"token": "e", "logprob": -9999.0, "bytes": [101]}]},
]}


class _Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return {6: "d"}[ids[0]]


def test_chat_logprobs_clamps_sampled_and_top_logprobs():
    token_ids, steps = _steps()
    out = chat_logprobs(token_ids, steps, 2, _Tokenizer())
    assert out == EXPECTED
    json.dumps(out, allow_nan=False)  # what the plain answer's JSONResponse demands


class _Engine:
    """What the chat route uses of vLLM's AsyncLLM: a renderer, generate, abort."""

    class renderer:  # noqa: N801 - an attribute, as on AsyncLLM
        default_chat_tok_params = SimpleNamespace(with_kwargs=lambda **kw: None)
        mm_processor_cache = None

        @staticmethod
        async def render_chat_async(conversations, chat_params, tok_params, **kwargs):
            return None, [{"prompt_token_ids": [1, 2, 3]}]

    errored = False
    model_config = SimpleNamespace(max_model_len=1024)

    async def generate(self, engine_input, params, request_id, **kwargs):
        token_ids, steps = _steps()
        output = SimpleNamespace(index=0, text="ad", token_ids=token_ids, logprobs=steps, finish_reason="length",
                                 stop_reason=None)
        yield SimpleNamespace(outputs=[output], finished=True, kv_transfer_params=None)

    async def abort(self, request_id):
        pass


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)  # NaN, Infinity, -Infinity refused


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_non_finite_logprobs_answered_as_json(stream):
    app = create_app(Settings(model="m"))
    state = app.state.gateway
    state.engine, state.tokenizer = _Engine(), _Tokenizer()
    state.verify_params = lambda params: None  # the engine's own checks: none in this fake
    state.layout = EngineLayout(image_token_id=0, num_layers=32, max_model_len=1024, max_num_seqs=4,
                                max_images_per_prompt=1)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "stream": stream}

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.post("/v1/chat/completions", json=body)

    r = asyncio.run(post())
    assert r.status_code == 200, r.text
    if stream:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [_strict_json(e) for e in events[:-1]]
        [logprobs] = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and "logprobs" in c["choices"][0]]
    else:
        logprobs = _strict_json(r.text)["choices"][0]["logprobs"]
    assert logprobs == EXPECTED
