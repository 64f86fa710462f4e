"""Parity with vLLM's own OpenAI server, side by side.

A module fixture starts `vllm.entrypoints.openai.api_server` on the tiny
checkpoint with the plugin off (`VLLM_PLUGINS=feather_cpu_compat`: stock
LLaVA, stock vLLM) and the shared gateway's engine settings (eager float32,
1 GiB of KV, context 1024, 4 sequences, the gateway's CPU block size 32,
hermes tool calls), sends the SAME battery of requests to it and to the
session gateway (tests/server_fixtures.py), four at a time at each, and
keeps the answers; each parametrized test then compares one request's pair:

- the HTTP status;
- the body, key by key at every level (a stream: event by event): keys only
  vLLM has, keys only the gateway has, and every shared value, floats
  (logprobs) within 1e-4: the greedy (or seeded) text, token ids, finish and
  stop reasons, usage, tool calls, token lists must be vLLM's;
- the case's own check on each server (e.g. `top_k: 1` at temperature 2 is
  the greedy text, `min_tokens` gives exactly that many tokens).

Allowed are only the deliberate differences the README lists under "Parity
with vLLM's own server": null fields and `system_fingerprint` left out, the
`feather` report and `/version`'s `feather_vllm` added, no prompt logprobs
with `echo`, OpenAI's error `type` and the gateway's own error messages; ids
and timestamps are not compared. Fields the gateway refuses (server/fields.py
REFUSED) get 400 naming the field there; vLLM's status for each is asserted
beside it (VLLM_ON_REFUSED).

Why: the gateway claims vLLM's API with vLLM's semantics. The other gateway
tests check it against vLLM's offline engine and vLLM's request classes;
this one checks the wire against the server users would otherwise run. A
difference that is not deliberate is not hidden: its case lists it in KNOWN
and the test asserts exactly that list, so a fix (or a new difference) fails
until KNOWN is updated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from loadtest.benchmark import Server
from server.fields import ALL_FIELDS, REFUSED
from tests.helpers import free_port, png_data_url, sample_images
from tests.server_fixtures import AUTH, KEY, image_chat

TOL = 1e-4
MAX_TOKENS = 8
TEXT = "Where is the red square?"
WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}}, "required": ["city"],
    "additionalProperties": False}}}

# Deliberate (README, "Parity with vLLM's own server"). A vLLM-only key whose
# value is null is always allowed (the gateway leaves null fields out).
OMITTED = {"system_fingerprint", "prompt_logprobs"}  # vLLM-only keys, even when vLLM fills them
ADDED = {"feather", "feather_vllm", "image_tokens", "images"}  # gateway-only keys
BY_DESIGN = {"error.type", "error.message"}  # shared keys whose values differ
VOLATILE = {"id", "created"}  # differ per answer; tool call ids are compared by prefix

# Observed differences that the README does not call deliberate: asserted exactly, per case.
PROBE_BODY = [": gateway {'status': 'ok'}, vLLM ''"]
KNOWN: dict[str, list[str]] = {
    # Deliberate (README): a JSON status body on the probes, OpenAI's string error codes.
    "ping": PROBE_BODY,
    "health": PROBE_BODY,
    "error-temperature": ["error.code: gateway 'less_than_equal', vLLM 400"],
    "error-model": ["error.code: gateway 'model_not_found', vLLM 404"],
}

# A non-default value of each field the gateway refuses, and vLLM's status for it.
REFUSED_VALUES: dict[str, Any] = {
    "reasoning_effort": "low", "thinking_token_budget": 4, "use_beam_search": True, "length_penalty": 2.0,
    "prompt_logprobs": 1, "documents": [{"title": "a", "text": "b"}], "chat_template": "{{ 'x' }}",
    "media_io_kwargs": {"image": {"mode": "RGB"}}, "mm_processor_kwargs": {"do_resize": False},
    "kv_transfer_params": {"do_remote_decode": False}, "ec_transfer_params": {"x": 1}, "vllm_xargs": {"x": 1},
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
}
# 400 where vLLM refuses them too by default (no reasoning config, untrusted templates and mm kwargs).
VLLM_ON_REFUSED = {name: 400 if name in {"thinking_token_budget", "chat_template", "media_io_kwargs",
                                         "mm_processor_kwargs"} else 200 for name in REFUSED_VALUES}


@dataclass
class Reply:
    status: int
    body: Any  # JSON; a stream: its events; a body that is not JSON: its text


Check = Callable[[Reply, dict[str, Reply]], None]  # (a case's reply, all that server's replies)


@dataclass(frozen=True)
class Case:
    id: str
    body: dict[str, Any] | None = None  # None: GET
    path: str = "/v1/chat/completions"
    stream: bool = False
    refused: str | None = None  # a REFUSED field: the gateway answers 400 naming it
    check: Check | None = None  # run on each server's reply


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": TEXT}], "max_tokens": MAX_TOKENS,
            "temperature": 0, **extra}


def text_of(reply: Reply) -> str:
    if isinstance(reply.body, list):  # a stream
        return "".join(c["delta"].get("content") or "" for e in reply.body for c in e["choices"])
    choice = reply.body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def same_text_as(other: str) -> Check:
    def check(reply: Reply, replies: dict[str, Reply]) -> None:
        assert text_of(reply) == text_of(replies[other])
    return check


def expect(**want: Any) -> Check:
    """The first choice's fields; `text`: its text, `tokens`/`prompt_tokens`: usage's, `calls`: the tool names."""
    def check(reply: Reply, _: dict[str, Reply]) -> None:
        choice, usage = reply.body["choices"][0], reply.body["usage"]
        special = {"text": lambda: text_of(reply), "tokens": lambda: usage["completion_tokens"],
                   "prompt_tokens": lambda: usage["prompt_tokens"],
                   "calls": lambda: [c["function"]["name"] for c in choice["message"].get("tool_calls", [])]}
        assert {k: special[k]() if k in special else choice[k] for k in want} == want
    return check


def text_holds(what: str, pred: Callable[[str], bool]) -> Check:
    def check(reply: Reply, _: dict[str, Reply]) -> None:
        assert pred(text_of(reply)), f"{what}: {text_of(reply)!r}"
    return check


@dataclass(frozen=True)
class Probe:
    """What the battery takes from the tokenizer and from vLLM's greedy answer to `chat()`."""

    eos: int
    bos: int
    words: list[int]  # " red", " square", " circle"
    greedy: list[int]  # vLLM's greedy token ids
    stop_text: str  # the text of its third and fourth tokens
    word: str  # its second token's text, stripped
    no_whitespace: dict[str, int]  # logit_bias against whitespace (JSON would spend its tokens there)

    @classmethod
    def of(cls, tok: Any, greedy: list[int]) -> Probe:
        blank = {str(i): -100 for i in range(len(tok)) if tok.decode([i]) and not tok.decode([i]).strip()}
        return cls(tok.eos_token_id, tok.bos_token_id, tok.encode(" red square circle", add_special_tokens=False),
                   greedy, tok.decode(greedy[2:4]).strip(), tok.decode(greedy[1:2]).strip(), blank)


def cases(p: Probe) -> list[Case]:
    """The battery, one case per request."""
    red, square, circle = p.words
    history = [{"role": "user", "content": TEXT}, {"role": "assistant", "content": "It is"}]
    schema = {"type": "object", "properties": {"side": {"type": "string", "enum": ["left", "right"]}},
              "required": ["side"]}
    tools = {"tools": [WEATHER], "logit_bias": p.no_whitespace, "max_tokens": 128}
    completion = {"model": "tiny", "prompt": TEXT, "max_tokens": MAX_TOKENS, "temperature": 0}
    return [
        Case("plain", chat()),
        Case("image", image_chat(png_data_url(sample_images()[1]))),
        Case("stream", chat(stream=True, stream_options={"include_usage": True}), stream=True,
             check=same_text_as("plain")),
        Case("top_k-1-at-temperature-2", chat(top_k=1, temperature=2), check=same_text_as("plain")),
        Case("min_p", chat(temperature=1, seed=5, min_p=0.3)),
        # the greedy first token would stop it at once; min_tokens holds the stop back
        Case("min_tokens", chat(min_tokens=MAX_TOKENS, stop_token_ids=[p.greedy[0]]), check=expect(tokens=MAX_TOKENS)),
        Case("repetition_penalty", chat(repetition_penalty=1.8)),
        Case("frequency_penalty", chat(frequency_penalty=2)),
        Case("presence_penalty", chat(presence_penalty=2)),
        Case("stop", chat(stop=[p.stop_text]), check=expect(finish_reason="stop", stop_reason=p.stop_text)),
        Case("stop_token_ids", chat(stop_token_ids=[p.greedy[2]]),
             check=expect(finish_reason="stop", stop_reason=p.greedy[2], tokens=3)),
        Case("include_stop_str_in_output", chat(stop=[p.stop_text], include_stop_str_in_output=True),
             check=text_holds("ends with the stop string", lambda t: t.endswith(p.stop_text))),
        Case("eos", chat(logit_bias={str(p.eos): 100}), check=expect(finish_reason="stop", tokens=1)),
        Case("ignore_eos", chat(ignore_eos=True, logit_bias={str(p.eos): 100}),
             check=expect(finish_reason="length", tokens=MAX_TOKENS)),
        Case("n-2-seed", chat(n=2, temperature=1, seed=11)),
        Case("logprobs", chat(logprobs=True, top_logprobs=3)),
        Case("logit_bias", chat(logit_bias={str(square): 100}), check=expect(text=" square" * MAX_TOKENS)),
        Case("allowed_token_ids", chat(allowed_token_ids=[red, circle]),
             check=text_holds("only the allowed words", lambda t: not t.replace(" red", "").replace(" circle", ""))),
        Case("bad_words", chat(bad_words=[p.word]), check=text_holds("no bad word", lambda t: p.word not in t)),
        Case("seed-temperature-1", chat(temperature=1, seed=3)),
        Case("response_format-json_object", chat(response_format={"type": "json_object"})),
        Case("response_format-json_schema",
             chat(response_format={"type": "json_schema", "json_schema": {"name": "side", "schema": schema}},
                  logit_bias=p.no_whitespace, max_tokens=32),
             check=text_holds("the schema's JSON", lambda t: json.loads(t)["side"] in ("left", "right"))),
        Case("structured_outputs-choice", chat(structured_outputs={"choice": ["left", "right"]}),
             check=text_holds("a choice", lambda t: t in ("left", "right"))),
        Case("structured_outputs-regex", chat(structured_outputs={"regex": "[a-z]{3} [0-9]{2}"})),
        Case("skip_special_tokens-false", chat(skip_special_tokens=False, logit_bias={str(p.bos): 100}),
             check=expect(text="<s>" * MAX_TOKENS)),
        Case("return_token_ids", chat(return_token_ids=True)),
        Case("echo", chat(messages=history, add_generation_prompt=False, continue_final_message=True, echo=True),
             check=text_holds("the last message first", lambda t: t.startswith("It is"))),
        Case("chat_template_kwargs", chat(chat_template_kwargs={"greeting": "hi"}), check=same_text_as("plain")),
        Case("continue_final_message", chat(messages=history, add_generation_prompt=False,
                                            continue_final_message=True)),
        Case("truncate_prompt_tokens", chat(truncate_prompt_tokens=5), check=expect(prompt_tokens=5)),
        Case("tool_choice-required", chat(tool_choice="required", **tools),
             check=expect(finish_reason="tool_calls", calls=["get_weather"])),
        Case("tool_choice-named", chat(tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       **tools), check=expect(finish_reason="stop", calls=["get_weather"])),
        Case("error-temperature", chat(temperature=5)),
        Case("error-model", chat(model="nope")),
        *(Case(f"refused-{name}", chat(**{name: value}), refused=name) for name, value in REFUSED_VALUES.items()),
        Case("models", path="/v1/models"),
        Case("tokenize-prompt", {"model": "tiny", "prompt": TEXT}, path="/tokenize"),
        Case("tokenize-messages", {"model": "tiny", "messages": [{"role": "user", "content": TEXT}],
                                   "return_token_strs": True}, path="/tokenize"),
        Case("tokenize-image", {"model": "tiny", "messages": image_chat(png_data_url(sample_images()[1]))["messages"]},
             path="/tokenize"),
        Case("detokenize", {"model": "tiny", "tokens": p.greedy}, path="/detokenize"),
        Case("completions", completion, path="/v1/completions"),
        Case("completions-echo-logprobs", {**completion, "echo": True, "logprobs": 2}, path="/v1/completions"),
        Case("version", path="/version"),
        Case("ping", path="/ping"),
        Case("health", path="/health"),
    ]


CASE_IDS = [c.id for c in cases(Probe(0, 0, [0, 0, 0], [0] * 4, "x", "x", {}))]


def send(client: httpx.Client, case: Case) -> Reply:
    if case.body is None:
        r = client.get(case.path)
    elif case.stream:
        with client.stream("POST", case.path, json=case.body) as r:
            r.read()
        if r.status_code == 200:
            lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert lines[-1] == "[DONE]", lines[-1:]
            return Reply(200, [json.loads(line) for line in lines[:-1]])
    else:
        r = client.post(case.path, json=case.body)
    try:
        return Reply(r.status_code, r.json())
    except ValueError:
        return Reply(r.status_code, r.text)


def diff(gw: Any, vl: Any, path: str = "") -> list[str]:
    """Every difference between the gateway's answer and vLLM's but the deliberate ones."""
    if isinstance(gw, dict) and isinstance(vl, dict):
        out = [f"{path}.{k}: only vLLM".lstrip(".") for k in sorted(vl.keys() - gw.keys())
               if vl[k] is not None and k not in OMITTED]
        out += [f"{path}.{k}: only gateway".lstrip(".") for k in sorted(gw.keys() - vl.keys()) if k not in ADDED]
        for k in sorted(gw.keys() & vl.keys()):
            sub = f"{path}.{k}".lstrip(".")
            if k not in VOLATILE and sub not in BY_DESIGN:
                out += diff(gw[k], vl[k], sub)
        return out
    if isinstance(gw, list) and isinstance(vl, list):
        out = [] if len(gw) == len(vl) else [f"{path}: {len(gw)} items, vLLM {len(vl)}"]
        return out + [d for i, (g, v) in enumerate(zip(gw, vl)) for d in diff(g, v, f"{path}[{i}]")]
    if isinstance(gw, float) or isinstance(vl, float):
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (gw, vl))
        if numbers and abs(gw - vl) <= TOL:
            return []
    elif gw == vl and type(gw) is type(vl):  # True is not 1
        return []
    return [f"{path}: gateway {gw!r:.80}, vLLM {vl!r:.80}"]


def normalized(body: Any) -> Any:
    """Tool call ids are random per answer (`chatcmpl-tool-<uuid>`): only their prefix is kept."""
    if isinstance(body, dict):
        return {k: v.split("-tool-")[0] + "-tool-" if k == "id" and isinstance(v, str) and "-tool-" in v
                else normalized(v) for k, v in body.items()}
    return [normalized(v) for v in body] if isinstance(body, list) else body


@dataclass
class Battery:
    cases: dict[str, Case]
    gateway: dict[str, Reply]
    vllm: dict[str, Reply]


def run_battery(gateway_url: str, vllm_url: str, tok: Any) -> Battery:
    """Every case at both servers, four at a time at each (the shared gateway
    admits 4 running and 4 waiting)."""
    with httpx.Client(base_url=gateway_url, headers=AUTH, timeout=120) as gw, \
            httpx.Client(base_url=vllm_url, headers=AUTH, timeout=120) as vl, \
            ThreadPoolExecutor(4) as gw_pool, ThreadPoolExecutor(4) as vl_pool:
        probe = vl.post("/v1/chat/completions", json=chat(return_token_ids=True)).json()
        battery = {c.id: c for c in cases(Probe.of(tok, probe["choices"][0]["token_ids"]))}
        futures = {name: (gw_pool.submit(send, gw, c), vl_pool.submit(send, vl, c)) for name, c in battery.items()}
        return Battery(battery, {k: g.result() for k, (g, _) in futures.items()},
                       {k: v.result() for k, (_, v) in futures.items()})


@pytest.fixture(scope="module")
def vllm_server(tiny_checkpoint, tmp_path_factory) -> Iterator[Server]:
    """vLLM's own server; asked for before the shared gateway, so the two start side by side."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_checkpoint),
            "--served-model-name", "tiny", "--port", str(port), "--api-key", KEY, "--dtype", "float32",
            "--enforce-eager", "--kv-cache-memory-bytes", "1G", "--max-model-len", "1024", "--max-num-seqs", "4",
            "--block-size", "32",  # the gateway's CPU default (README, "Set differently from vLLM's defaults")
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    proc = Server(argv, tmp_path_factory.mktemp("vllm") / "vllm_server.log", port,
                  env={"VLLM_PLUGINS": "feather_cpu_compat", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def battery(vllm_server: Server, server, tiny_checkpoint) -> Battery:
    from transformers import AutoTokenizer

    vllm_server.wait(300)
    return run_battery(server.url, vllm_server.url, AutoTokenizer.from_pretrained(tiny_checkpoint))


def compare(b: Battery, name: str) -> list[str]:
    """One case's differences that are not deliberate; its own check runs on both servers' replies."""
    case, gw, vl = b.cases[name], b.gateway[name], b.vllm[name]
    if case.refused:
        assert gw.status == 400 and gw.body["error"]["param"] == case.refused, gw.body
        assert vl.status == VLLM_ON_REFUSED[case.refused], vl.body
        return []
    found = [] if gw.status == vl.status else [f"status: gateway {gw.status}, vLLM {vl.status}"]
    if case.check is not None and gw.status == vl.status == 200:
        case.check(gw, b.gateway)
        case.check(vl, b.vllm)
    return found + diff(normalized(gw.body), normalized(vl.body))


@pytest.mark.parametrize("name", CASE_IDS)
def test_parity_with_vllm_server(battery: Battery, name: str) -> None:
    assert compare(battery, name) == KNOWN.get(name, [])


def test_every_refused_field_is_in_the_battery() -> None:
    assert set(REFUSED_VALUES) == {name for name, (status, _) in ALL_FIELDS.items() if status == REFUSED}
