"""vLLM API parity through the shared gateway (tests/server_fixtures.py,
started with vLLM's `--enable-auto-tool-choice --tool-call-parser hermes`):
tool calls (plain and streamed), /v1/completions, /tokenize with images and
pruning settings, the refused /v1/responses, and chat's echo,
return_token_ids, return_prompt_text and chat_template_kwargs. Every answer
comes from the real engine on the tiny checkpoint, whose chat template
speaks Hermes' tool format (feather_vllm/tools/checkpoints.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server_fixtures import image_chat

TEXT = "Where is the red square?"
WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC"]}}, "required": ["zone"],
    "additionalProperties": False}}}
# The pythonic regex an `auto` answer is held to (tool_choice auto with structured_outputs, as vLLM allows).
TIME_CALL = '<tool_call>\n\\{"name": "get_time", "arguments": \\{"zone": "UTC"\\}\\}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def no_whitespace(tokenizer) -> dict[str, int]:
    """logit_bias against whitespace tokens: JSON in vLLM's structural tags
    allows any whitespace, where a random-weight model would spend its
    tokens (the grammar still forces what it must)."""
    return {str(i): -100 for i in range(len(tokenizer))
            if tokenizer.decode([i]) and not tokenizer.decode([i]).strip()}


def chat(**extra) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": TEXT}], "max_tokens": 8, "temperature": 0}
    body.update(extra)
    return body


def ok(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def events(client, path: str, body: dict) -> list[dict]:
    """The JSON events of a stream (until [DONE])."""
    out = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return out
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    raise AssertionError("the stream ended without [DONE]")


def refused(client, path: str, body: dict, status: int, param: str | None, **error) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    got = r.json()["error"]
    assert got["param"] == param and all(got[k] == v for k, v in error.items()), got
    return got


# -- tool calls ------------------------------------------------------------------------

CALLS = [  # tool_choice, extra request fields, the exact calls, finish_reason, content
    ({"type": "function", "function": {"name": "get_weather"}}, {}, [("get_weather", {"city": "Paris"})], "stop", ""),
    ("required", {"tools": [TIME], "parallel_tool_calls": False}, [("get_time", {"zone": "UTC"})], "tool_calls", ""),
    ("auto", {"structured_outputs": {"regex": TIME_CALL}}, [("get_time", {"zone": "UTC"})], "tool_calls", None),
    ("auto", {"structured_outputs": {"regex": "Paris is sunny"}}, [], "stop", "Paris is sunny"),
]


def tool_body(no_whitespace: dict[str, int], choice: Any, **extra: Any) -> dict:
    return {**chat(tools=[WEATHER, TIME], tool_choice=choice, max_tokens=128, logit_bias=no_whitespace), **extra}


def check_answer(client, body: dict, calls: list, finish: str, content: str | None) -> None:
    """The plain answer has exactly `calls` in OpenAI's shape; the stream's
    deltas add up to the same calls, none of their text as content."""
    answer = ok(client, "/v1/chat/completions", body)
    choice = answer["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == finish and message["content"] == content, choice
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
    assert got == calls
    for call in message.get("tool_calls", []):
        assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
        assert isinstance(call["function"]["arguments"], str)  # a JSON string, as OpenAI's

    chunks = events(client, "/v1/chat/completions", body)
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    streamed: dict[int, dict] = {}
    text = ""
    for d in deltas[1:]:
        text += d["delta"].get("content") or ""
        for tc in d["delta"].get("tool_calls", []):
            call = streamed.setdefault(tc["index"], {"arguments": ""})
            if "id" in tc:  # the first delta of a call: its id, type and name
                assert tc["type"] == "function" and tc["id"].startswith("chatcmpl-tool-")
                call["name"] = tc["function"]["name"]
            call["arguments"] += tc["function"].get("arguments", "")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == calls
    assert text == (content or "") and deltas[-1]["finish_reason"] == finish


@pytest.mark.parametrize("choice, extra, calls, finish, content", CALLS,
                         ids=["named", "required-single", "auto-call", "auto-text"])
def test_tool_calls_plain_and_streamed(client, no_whitespace, choice, extra, calls, finish, content):
    """vLLM's own machinery end to end: the call forced by its structured
    outputs (hermes' structural tag; `auto` held to a call or to text by a
    regex beside it), parsed by its hermes parser, answered in OpenAI's
    shape (finish_reason "tool_calls", "stop" for a named call)."""
    check_answer(client, tool_body(no_whitespace, choice, **extra), calls, finish, content)


def test_parallel_tool_calls(client, no_whitespace, tokenizer):
    """`required` lets this model call get_time again and again; cut after
    its second call, the answer holds two calls (finish_reason "length": it
    did not stop). `parallel_tool_calls: false` holds it to one (vLLM's
    single-call grammar) and it stops."""
    body = tool_body(no_whitespace, "required", tools=[TIME], max_tokens=200, return_token_ids=True)
    ids = ok(client, "/v1/chat/completions", body)["choices"][0]["token_ids"]
    cut = next(k for k in range(1, len(ids) + 1) if tokenizer.decode(ids[:k]).count("</tool_call>") == 2)
    two = [("get_time", {"zone": "UTC"})] * 2
    check_answer(client, {**body, "max_tokens": cut, "return_token_ids": False}, two, "length", "")
    check_answer(client, {**body, "parallel_tool_calls": False}, two[:1], "tool_calls", "")


def test_tools_reach_the_chat_template_and_history_renders(client, tokenizer):
    """The tools (as vLLM dumps them), an assistant's earlier call and the
    tool's answer render through vLLM's renderer exactly as transformers
    renders the checkpoint's template."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    tokens = ok(client, "/tokenize", {"messages": messages, "tools": [WEATHER]})["tokens"]
    tok = tokenizer
    history = [*messages[:1], {**messages[1], "tool_calls": [{**call, "function": {"name": "get_weather",
                                                                                   "arguments": {"city": "Paris"}}}]},
               messages[2]]
    expected = tok.apply_chat_template(history, tools=[ChatCompletionToolsParam.model_validate(WEATHER).model_dump()],
                                       tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<s><tools>\n") and '<tool_call>\n{"name": "get_weather"' in expected
    assert "<tool_response>\nsunny\n</tool_response>" in expected
    assert tokens == tok(expected, add_special_tokens=False)["input_ids"]
    # The same conversation is a chat completion's prompt, and answers.
    answer = ok(client, "/v1/chat/completions", chat(messages=messages, tools=[WEATHER], tool_choice="none",
                                                      max_tokens=2))
    assert answer["usage"]["prompt_tokens"] == len(tokens) and "tool_calls" not in answer["choices"][0]["message"]


@pytest.mark.parametrize("extra, param, message", [
    ({"tools": []}, "tools", "`tools` must not be an empty array"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "The tool specified in `tool_choice` does not match any of the specified `tools`"),
    ({"tool_choice": "required"}, "tool_choice", "When using `tool_choice`, `tools` must be set."),
    ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "description": "see <image>"}}]},
     "tools[0].function.description", "special token '<image>'"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages[0].tool_call_id", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls", "assistant"),
    ({"messages": [{"role": "user", "content": "x", "nmae": "typo"}]}, "messages[0].nmae", "unknown field"),
], ids=["empty-tools", "named-not-in-tools", "choice-without-tools", "special-token-in-tool", "tool-without-id",
        "calls-in-user-message", "unknown-message-key"])
def test_tool_and_message_errors(client, extra, param, message):
    got = refused(client, "/v1/chat/completions", chat(**extra), 400, param)
    assert message in got["message"], got


@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
def test_unknown_message_keys_refused_unless_lenient(lenient, caplog):
    """--lenient-fields covers message keys too (ignored with a warning naming them, as vLLM ignores them)."""
    import logging
    import types

    from server.conversation import check_messages
    from server.errors import APIError
    from server.schemas import Message

    state = types.SimpleNamespace(settings=types.SimpleNamespace(lenient_fields=lenient))
    messages = [Message.model_validate({"role": "user", "content": "x"}),
                Message.model_validate({"role": "user", "content": "x", "nmae": "typo"})]
    with caplog.at_level(logging.WARNING, logger="server"):
        if lenient:
            check_messages(messages, state)
            assert "messages[1].nmae" in caplog.text
        else:
            with pytest.raises(APIError) as err:
                check_messages(messages, state)
            assert (err.value.status, err.value.param) == (400, "messages[1].nmae")


@pytest.mark.parametrize("choice, enable_auto, message", [
    ("auto", False, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
    ("required", False, 'tool_choice="required" requires --tool-call-parser to be set'),
    ({"type": "function", "function": {"name": "get_weather"}}, True,
     'tool_choice=function "get_weather" requires --tool-call-parser to be set'),
], ids=["auto", "required", "named"])
def test_tool_choice_without_a_parser_is_vllms_400(choice, enable_auto, message):
    """A server without vLLM's tool flags refuses as vLLM's renderer does
    (the check on vLLM's own request; the shared gateway has the flags)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from server import tools
    from server.errors import APIError

    vreq = ChatCompletionRequest.model_validate({"messages": [], "tools": [WEATHER], "tool_choice": choice})
    with pytest.raises(APIError) as err:
        tools.check_choice(vreq, None, enable_auto)
    assert (err.value.status, err.value.param, err.value.message) == (400, "tool_choice", message)


@pytest.mark.parametrize("argv, message", [
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice requires --tool-call-parser"),
    (["--enable-auto-tool-choice", "--tool-call-parser", "nope"], "invalid tool call parser: nope"),
], ids=["no-parser", "unknown-parser"])
def test_tool_flags_are_checked_at_start(tiny_checkpoint, capsys, argv, message):
    from server.settings import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--model", str(tiny_checkpoint), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# -- /v1/completions -----------------------------------------------------------------------


def cmpl(**extra) -> dict:
    body = {"model": "tiny", "prompt": TEXT, "max_tokens": 6, "temperature": 0}
    body.update(extra)
    return body


@pytest.fixture(scope="module")
def greedy_cmpl(client) -> dict:
    """The greedy completion of TEXT, with its prompt and answer token ids."""
    body = ok(client, "/v1/completions", cmpl(return_token_ids=True))
    choice = body["choices"][0]
    assert len(choice["token_ids"]) == 6 and choice["finish_reason"] == "length"
    return {"text": choice["text"], "ids": choice["token_ids"], "prompt_ids": choice["prompt_token_ids"],
            "usage": body["usage"], "id": body["id"]}


def test_completion_of_text_and_of_its_token_ids_agree(client, greedy_cmpl):
    assert greedy_cmpl["id"].startswith("cmpl-")
    assert greedy_cmpl["usage"] == {"prompt_tokens": len(greedy_cmpl["prompt_ids"]), "completion_tokens": 6,
                                    "total_tokens": len(greedy_cmpl["prompt_ids"]) + 6}
    # vLLM's prompt tokens: its tokenizer with special tokens (BOS), as /tokenize says.
    assert greedy_cmpl["prompt_ids"] == ok(client, "/tokenize", {"prompt": TEXT})["tokens"]
    by_ids = ok(client, "/v1/completions", cmpl(prompt=greedy_cmpl["prompt_ids"], return_token_ids=True))
    assert by_ids["choices"][0]["text"] == greedy_cmpl["text"] and by_ids["choices"][0]["token_ids"] == \
        greedy_cmpl["ids"]


@pytest.mark.parametrize("as_ids", [False, True], ids=["strings", "token-lists"])
def test_several_prompts_answer_in_order(client, greedy_cmpl, as_ids):
    other = "Describe the picture in one word."
    single = ok(client, "/v1/completions", cmpl(prompt=other))["choices"][0]["text"]
    prompts = [TEXT, other]
    if as_ids:
        prompts = [ok(client, "/tokenize", {"prompt": p})["tokens"] for p in prompts]
    body = ok(client, "/v1/completions", cmpl(prompt=prompts))
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, greedy_cmpl["text"]), (1, single)]


def test_echo_with_logprobs(client, greedy_cmpl):
    """vLLM's echo: the prompt before the answer, its logprobs from the
    engine's prompt logprobs (none for the first token), then the answer's;
    each step lists logprobs + 1 candidates (OpenAI's rule), text offsets
    counting the tokens' text."""
    body = ok(client, "/v1/completions", cmpl(echo=True, logprobs=2))
    choice = body["choices"][0]
    assert choice["text"] == TEXT + greedy_cmpl["text"]
    lp = choice["logprobs"]
    n_prompt = len(greedy_cmpl["prompt_ids"])
    assert len(lp["tokens"]) == n_prompt + 6 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert len(choice["prompt_logprobs"]) == n_prompt and choice["prompt_logprobs"][0] is None
    # max_tokens 0 with echo: the prompt only (vLLM generates one token for it, and counts it).
    only = ok(client, "/v1/completions", cmpl(echo=True, max_tokens=0))
    assert only["choices"][0]["text"] == TEXT and only["usage"]["completion_tokens"] == 1


def test_completion_stream_equals_the_plain_answer(client, greedy_cmpl):
    chunks = events(client, "/v1/completions", cmpl(echo=True, return_token_ids=True,
                                                    stream_options={"include_usage": True}))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    # With return_token_ids vLLM echoes no prompt text; the prompt's ids come with the first chunk.
    assert choices[0]["prompt_token_ids"] == greedy_cmpl["prompt_ids"]
    assert "".join(c["text"] for c in choices) == greedy_cmpl["text"]
    assert [t for c in choices for t in c.get("token_ids", [])] == greedy_cmpl["ids"]
    assert choices[-1]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == greedy_cmpl["usage"]


def test_completion_sampling_fields(client, greedy_cmpl):
    import re

    found = re.search(r"[A-Za-z]{2}", greedy_cmpl["text"][1:])  # an ASCII stop string past the first character
    assert found, f"the checks below need letters in the greedy answer: {greedy_cmpl['text']!r}"
    stop = found.group()
    body = ok(client, "/v1/completions", cmpl(stop=[stop]))
    assert body["choices"][0]["text"] == greedy_cmpl["text"][:greedy_cmpl["text"].index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] == stop
    two = ok(client, "/v1/completions", cmpl(n=2, temperature=1.0, seed=7, max_tokens=3, ignore_eos=True))
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["usage"]["completion_tokens"] == 6


def test_completions_need_a_key(server):
    r = httpx.post(server.url + "/v1/completions", json=cmpl())
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("extra, status, param, message", [
    ({"suffix": "x"}, 400, "suffix", "suffix is only supported for models with FIM completion rendering"),
    ({"feather": {"preset": "feather"}}, 400, "feather", "completions take no images"),
    ({"prompt": "a <image> b"}, 400, "prompt", "image placeholder"),
    ({"prompt": [[1, 40], [1, 4, 5]]}, 400, "prompt[1]", "image placeholder"),
    ({"prompt": ""}, 400, "prompt", "Either prompt or prompt_embeds must be provided and non-empty."),
    ({"prompt": []}, 400, "prompt", "You must pass at least one prompt"),
    ({"frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ({"use_beam_search": True}, 400, "use_beam_search", "beam search is not served"),
    ({"max_tokens": 5000}, 400, "max_tokens", "max_tokens=5000 cannot be greater than max_model_len=1024"),
    ({"n": 2}, 400, "n", "n must be 1 when using greedy sampling"),
    ({"model": "gpt-9"}, 404, "model", "does not exist"),
], ids=["suffix", "feather", "image-placeholder-text", "image-placeholder-id", "empty-prompt", "no-prompts",
        "unknown-field", "beam-search", "max-tokens-beyond-context", "n-greedy", "unknown-model"])
def test_completion_errors(client, extra, status, param, message):
    got = refused(client, "/v1/completions", cmpl(**extra), status, param)
    assert message in got["message"], got


# -- /tokenize with images and pruning settings ------------------------------------------------


@pytest.mark.parametrize("preset", ["fastv", "feather"])
def test_tokenize_reports_image_tokens_and_what_each_cut_keeps(client, scene_url, preset):
    """vLLM's tokens (each image's placeholder expanded, as its /tokenize),
    where the image is, and from the settings alone the kept counts each
    cut allows, which bound what the engine then keeps."""
    from feather_vllm.pruning.config import PRESETS
    from feather_vllm.pruning.cost import kept_per_stage_bounds

    body = image_chat(scene_url, feather={"preset": preset})
    answer = ok(client, "/v1/chat/completions", body)
    tok = ok(client, "/tokenize", {"messages": body["messages"], "feather": body["feather"]})
    assert tok["count"] == len(tok["tokens"]) == answer["usage"]["prompt_tokens"]
    (span,) = tok["images"]
    assert span["length"] == tok["image_tokens"] == answer["feather"]["image_tokens"] == 576
    image_id = tok["tokens"][span["offset"]]
    assert tok["tokens"][span["offset"]:span["offset"] + 576] == [image_id] * 576
    assert image_id not in tok["tokens"][:span["offset"]] + tok["tokens"][span["offset"] + 576:]
    bounds = kept_per_stage_bounds(PRESETS[preset], 576)
    stages = [{"layer": s.layer, "kept_min": lo, "kept_max": hi} for s, (lo, hi) in zip(PRESETS[preset].stages, bounds)]
    assert tok["feather"] == {"preset": preset, "image_tokens": 576, "stages": stages, "images": [stages]}
    for kept, stage in zip(answer["feather"]["stages"], stages):
        assert kept["layer"] == stage["layer"] and stage["kept_min"] <= kept["kept"] <= stage["kept_max"]


def test_tokenize_without_images_adds_nothing_and_bad_settings_are_refused(client, scene_url):
    plain = ok(client, "/tokenize", {"messages": [{"role": "user", "content": TEXT}]})
    assert set(plain) == {"count", "max_model_len", "tokens", "token_strs"}  # vLLM's shape
    body = image_chat(scene_url)
    refused(client, "/tokenize", {"messages": body["messages"], "feather": {"preset": "nope"}}, 400,
            "feather.preset", code="invalid_pruning_settings")
    refused(client, "/tokenize", {"messages": body["messages"], "chat_template_kwargs": {"eos_token": "<image>"}},
            400, "chat_template_kwargs.eos_token")


# -- /v1/responses -------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1")],
                         ids=["create", "retrieve"])
def test_responses_api_is_refused_by_name(server, client, method, path):
    r = client.request(method, path, json={"model": "tiny", "input": "hi"} if method == "POST" else None)
    assert r.status_code == 404
    assert r.json() == {"error": {
        "message": "/v1/responses (OpenAI's Responses API) is not served by this server; use /v1/chat/completions "
                   "or /v1/completions", "type": "not_found_error", "param": None, "code": "endpoint_not_served"}}
    assert httpx.request(method, server.url + path).status_code == 401


# -- chat: echo, return_token_ids, return_prompt_text, chat_template_kwargs -------------------


def test_chat_echo_continues_the_last_message(client):
    messages = [{"role": "user", "content": TEXT}, {"role": "assistant", "content": "It is"}]
    base = chat(messages=messages, add_generation_prompt=False, continue_final_message=True, max_tokens=4)
    plain = ok(client, "/v1/chat/completions", base)["choices"][0]["message"]["content"]
    echoed = ok(client, "/v1/chat/completions", {**base, "echo": True})["choices"][0]["message"]
    assert echoed == {"role": "assistant", "content": "It is" + plain}
    deltas = [c["choices"][0]["delta"] for c in events(client, "/v1/chat/completions", {**base, "echo": True})
              if c["choices"]]
    assert deltas[1] == {"content": "It is"} and "".join(d.get("content", "") for d in deltas) == "It is" + plain
    refused(client, "/v1/chat/completions", {**base, "echo": True, "logprobs": True, "top_logprobs": 1}, 400,
            "top_logprobs")


def test_chat_returns_token_ids_and_prompt_text(client, scene_url):
    # Its own cache salt: the engine's prefix cache can hand an unpruned request wrong KV after pruned
    # requests of the same prompt (reported separately; not this test's subject).
    body = image_chat(scene_url, return_token_ids=True, return_prompt_text=True, logprobs=True,
                      return_tokens_as_token_ids=True, cache_salt="token-ids-test")
    answer = ok(client, "/v1/chat/completions", body)
    choice = answer["choices"][0]
    assert answer["prompt_token_ids"] == ok(client, "/tokenize", {"messages": body["messages"]})["tokens"]
    assert choice["token_ids"] == [int(t["token"].removeprefix("token_id:")) for t in choice["logprobs"]["content"]]
    # The engine's prompt text, as vLLM returns it: the image placeholder expanded to the image's tokens.
    assert answer["prompt_text"] == "<s>USER: " + "<image>" * 576 + f"\n{TEXT}\nASSISTANT:"
    chunks = events(client, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"] == answer["prompt_token_ids"]
    assert chunks[0]["prompt_text"] == answer["prompt_text"]
    assert [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])] == choice["token_ids"]


def test_chat_template_kwargs(client):
    base = ok(client, "/v1/chat/completions", chat())["choices"][0]["message"]["content"]
    # A variable the template does not read changes nothing (vLLM drops it before rendering).
    assert ok(client, "/v1/chat/completions", chat(chat_template_kwargs={"enable_thinking": False}))[
        "choices"][0]["message"]["content"] == base
    for key in ("bos_token", "tools", "add_generation_prompt", "chat_template"):
        refused(client, "/v1/chat/completions", chat(chat_template_kwargs={key: "x"}), 400,
                f"chat_template_kwargs.{key}", code="unsupported_parameter")
    refused(client, "/v1/chat/completions", chat(chat_template_kwargs={"note": "<image>"}), 400,
            "chat_template_kwargs.note", code="special_token_in_text")
