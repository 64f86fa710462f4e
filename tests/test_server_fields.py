"""Request fields through the shared gateway (tests/server_fixtures.py):
every field of vLLM's chat request is honoured with vLLM's semantics,
accepted without effect, or refused by name (server/fields.py); unknown
fields are refused unless --lenient-fields. Also vLLM's /version, /ping,
/tokenize and /detokenize, and the prefix cache isolated per API key."""

from __future__ import annotations

import logging
import re
import time
import types
from pathlib import Path

import httpx
import pytest

from server import fields
from tests.server_fixtures import AUTH, KEY, OTHER_KEY, _samples, image_chat

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Describe the picture in one word."


def text_chat(**extra) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": TEXT}], "max_tokens": 8, "temperature": 0}
    body.update(extra)
    return body


def _chat(client, body: dict) -> dict:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _token_ids(choice: dict) -> list[int]:
    """The generated token ids (logprobs with return_tokens_as_token_ids)."""
    return [int(t["token"].removeprefix("token_id:")) for t in choice["logprobs"]["content"]]


@pytest.fixture(scope="module")
def greedy(client) -> dict:
    """The greedy answer to TEXT: text, token ids, finish reason."""
    body = _chat(client, text_chat(logprobs=True, return_tokens_as_token_ids=True))
    choice = body["choices"][0]
    ids = _token_ids(choice)
    assert len(ids) == 8 and len(set(ids)) >= 2, "the checks below need a varied greedy answer"
    return {"text": choice["message"]["content"], "ids": ids}


# -- the table -------------------------------------------------------------------


def test_every_vllm_chat_field_is_classified_and_in_the_readme():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

    from server.schemas import ChatCompletionRequest

    assert set(VllmChatRequest.model_fields) <= set(fields.FIELDS)
    assert set(fields.ALL_FIELDS) == set(ChatCompletionRequest.model_fields)  # each one typed, none unclassified
    assert fields.readme_table() in (ROOT / "README.md").read_text()


# -- honoured: observable effects with the real engine ---------------------------


def test_top_k_1_at_temperature_2_is_greedy(client, greedy):
    for seed in (1, 2):
        body = _chat(client, text_chat(temperature=2, top_k=1, seed=seed))
        assert body["choices"][0]["message"]["content"] == greedy["text"]


def test_stop_token_ids_stop_with_vllms_stop_reason(client, greedy):
    stop = greedy["ids"][2]
    body = _chat(client, text_chat(stop_token_ids=[stop], logprobs=True, return_tokens_as_token_ids=True))
    choice = body["choices"][0]
    ids = _token_ids(choice)
    assert ids == greedy["ids"][:greedy["ids"].index(stop) + 1]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop


def test_min_tokens_holds_stop_tokens_back(client, greedy):
    stop = greedy["ids"][0]  # would stop at the first token
    body = _chat(client, text_chat(stop_token_ids=[stop], min_tokens=5))
    assert body["usage"]["completion_tokens"] >= 5


@pytest.mark.parametrize("include", [False, True], ids=["stop-str-excluded", "stop-str-included"])
def test_include_stop_str_in_output(client, greedy, include):
    text = greedy["text"]
    stop = text.strip()[len(text.strip()) // 2:][:2]
    assume = stop and stop in text
    if not assume:
        pytest.skip("greedy answer too short for a stop string")
    body = _chat(client, text_chat(stop=[stop], include_stop_str_in_output=include))
    out = body["choices"][0]["message"]["content"]
    prefix = text[:text.index(stop)]
    assert out == (prefix + stop if include else prefix)
    assert body["choices"][0]["stop_reason"] == stop


def test_allowed_token_ids_restrict_the_tokens(client, greedy):
    allowed = sorted(set(greedy["ids"][1:3]))
    body = _chat(client, text_chat(temperature=1.5, seed=3, allowed_token_ids=allowed, logprobs=True,
                                   return_tokens_as_token_ids=True, ignore_eos=True))
    assert set(_token_ids(body["choices"][0])) <= set(allowed)


def test_logit_bias_forces_a_token(client, greedy):
    token = greedy["ids"][3]
    body = _chat(client, text_chat(logit_bias={str(token): 100}, logprobs=True, return_tokens_as_token_ids=True,
                                   ignore_eos=True))
    assert _token_ids(body["choices"][0]) == [token] * 8


def test_logprob_token_ids_give_those_tokens(client, greedy):
    asked = greedy["ids"][1:3]
    body = _chat(client, text_chat(logprobs=True, logprob_token_ids=asked, return_tokens_as_token_ids=True))
    for step in body["choices"][0]["logprobs"]["content"]:
        assert {int(t["token"].removeprefix("token_id:")) for t in step["top_logprobs"]} >= set(asked)


def test_structured_outputs_choice(client):
    body = _chat(client, text_chat(structured_outputs={"choice": ["left", "right"]}))
    assert body["choices"][0]["message"]["content"] in ("left", "right")


def test_response_format_json_object(client):
    body = _chat(client, text_chat(response_format={"type": "json_object"}, max_tokens=16))
    assert body["choices"][0]["message"]["content"].lstrip().startswith("{")


def test_truncate_prompt_tokens_keeps_the_last_tokens(client):
    full = _chat(client, text_chat(max_tokens=1))["usage"]["prompt_tokens"]
    body = _chat(client, text_chat(max_tokens=1, truncate_prompt_tokens=5, truncation_side="left"))
    assert full > 5 and body["usage"]["prompt_tokens"] == 5


def test_a_truncation_that_would_cut_the_image_is_refused(client, scene_url):
    r = client.post("/v1/chat/completions", json=image_chat(scene_url, truncate_prompt_tokens=100))
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text


@pytest.mark.parametrize("refusal, colour", [
    ({"max_tokens": 500}, (1, 2, 3)),  # the gateway's own check, after rendering
    ({"truncate_prompt_tokens": 100}, (4, 5, 6)),  # vLLM's renderer's, after processing the image
], ids=["max-tokens-after-render", "truncation-in-renderer"])
def test_a_request_refused_after_rendering_leaves_its_image_servable(client, refusal, colour):
    """vLLM's renderer sends the engine a hash for an image it processed
    before: a request refused after rendering must not leave its image
    there, or the next request with it fails in the engine."""
    from PIL import Image

    from tests.helpers import png_data_url

    url = png_data_url(Image.new("RGB", (336, 336), colour))  # an image no other test sends
    r = client.post("/v1/chat/completions", json=image_chat(url, **refusal))
    assert r.status_code == 400, r.text
    body = _chat(client, image_chat(url, max_tokens=2))
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2


def test_request_id_names_the_response(client):
    assert _chat(client, text_chat(max_tokens=1, request_id="abc-1"))["id"] == "chatcmpl-abc-1"
    # The engine runs each under its own id: the same id twice at once is fine.
    assert _chat(client, text_chat(max_tokens=1, request_id="abc-1"))["id"] == "chatcmpl-abc-1"


def test_no_effect_and_default_fields_are_accepted(client, greedy):
    body = _chat(client, text_chat(user="u-1", metadata={"a": "b"}, store=False, service_tier="auto",
                                   echo=False, tool_choice="none", use_beam_search=False, length_penalty=1.0,
                                   include_reasoning=True, parallel_tool_calls=True, return_token_offsets=True,
                                   mm_payload="none", priority=0, session_id="s-1", watermarking=False,
                                   add_generation_prompt=True, skip_special_tokens=True,
                                   spaces_between_special_tokens=True, repetition_penalty=1.0, min_p=0.0))
    assert body["choices"][0]["message"]["content"] == greedy["text"]


# -- refused and unknown ------------------------------------------------------------


REFUSED = [
    ("reasoning_effort", "low"),
    ("thinking_token_budget", 10),
    ("use_beam_search", True),
    ("length_penalty", 0.5),
    ("prompt_logprobs", 1),
    ("documents", [{"title": "t", "text": "x"}]),
    ("chat_template", "{{ messages }}"),
    ("media_io_kwargs", {"image": {}}),
    ("mm_processor_kwargs", {"num_crops": 4}),
    ("kv_transfer_params", {"do_remote_prefill": True}),
    ("ec_transfer_params", {"x": 1}),
    ("vllm_xargs", {"feather": "none"}),
    ("functions", [{"name": "f"}]),
    ("response_format", {"type": "json_schema"}),  # vLLM's own check: json_schema needs its schema
]


@pytest.mark.parametrize("field, value", REFUSED, ids=[f for f, _ in REFUSED])
def test_refused_fields_get_400_naming_them(client, field, value):
    r = client.post("/v1/chat/completions", json=text_chat(**{field: value}))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


def test_every_refused_field_is_tested():
    tested = {f for f, _ in REFUSED} | {"function_call", "audio", "prediction"}  # test_server_errors.py
    assert {f for f, (status, _) in fields.ALL_FIELDS.items() if status == fields.REFUSED} <= tested


BAD = [
    ("unknown field", {"frobnicate": 1}, "frobnicate"),
    ("allowed id outside the vocabulary", {"allowed_token_ids": [10**6]}, "allowed_token_ids"),
    ("stop id negative", {"stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ("logit bias outside the vocabulary", {"logit_bias": {"1000000": 1}}, "logit_bias"),
    ("min_tokens beyond max_tokens", {"min_tokens": 20}, "min_tokens"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("continue and generation prompt", {"continue_final_message": True}, "continue_final_message"),
    ("cache salt with a slash", {"cache_salt": "a/b"}, "cache_salt"),
    ("top_k below -1", {"top_k": -5}, "top_k"),
    *((f"engine-wide structured_outputs.{option}", {"structured_outputs": {"json": {"type": "object"}, option: value}},
       f"structured_outputs.{option}")
      for option, value in (("disable_any_whitespace", True), ("disable_additional_properties", True),
                            ("whitespace_pattern", "[ ]?"))),
]


@pytest.mark.parametrize("kind, extra, param", BAD, ids=[k for k, _, _ in BAD])
def test_bad_values_get_400_naming_the_field(client, kind, extra, param):
    r = client.post("/v1/chat/completions", json=text_chat(**extra))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
def test_unknown_fields_refused_unless_lenient(lenient, caplog):
    """The --lenient-fields switch (the gateway's parsing is tested in test_gateway_cli.py)."""
    from server.errors import APIError
    from server.deps import check_unknown_fields

    state = types.SimpleNamespace(settings=types.SimpleNamespace(lenient_fields=lenient))
    with caplog.at_level(logging.WARNING, logger="server"):
        if lenient:
            check_unknown_fields({"frobnicate": 1}, state)
            assert "frobnicate" in caplog.text
        else:
            with pytest.raises(APIError) as err:
                check_unknown_fields({"frobnicate": 1}, state)
            assert err.value.status == 400 and err.value.param == "frobnicate"


# -- vLLM's other endpoints -----------------------------------------------------------


def test_version_and_ping(server, client):
    import vllm

    version = client.get("/version")
    assert version.status_code == 200 and version.json()["version"] == vllm.__version__
    assert re.fullmatch(r"\d+\.\d+.*", version.json()["feather_vllm"])
    assert httpx.get(server.url + "/version").status_code == 401
    for method in ("GET", "POST"):
        assert httpx.request(method, server.url + "/ping").status_code == 200  # a probe: no key


def test_tokenize_and_detokenize(server, client, greedy):
    r = client.post("/tokenize", json={"model": "tiny", "prompt": "hello there", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] == 1024
    plain = client.post("/tokenize", json={"prompt": "hello there", "add_special_tokens": False}).json()
    assert plain["tokens"] and plain["token_strs"] is None  # only when asked
    back = client.post("/detokenize", json={"tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "hello there"}
    # Chat messages: the prompt a chat completion runs.
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": TEXT}]}).json()
    assert chat["count"] == _chat(client, text_chat(max_tokens=1))["usage"]["prompt_tokens"]
    for path in ("/tokenize", "/detokenize"):
        assert httpx.post(server.url + path, json={"tokens": [1], "prompt": "x"}).status_code == 401


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"messages": [{"role": "user", "content": [  # images are tokenized (test_server_api.py): checked
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400,
     "messages[0].content[0].image_url.url"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ x }}"}, 400,
     "chat_template"),
    ("/detokenize", {"tokens": [10**7]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
], ids=["bad-image", "prompt-not-text", "unknown-model", "unknown-field", "chat-template", "id-outside-vocab",
        "negative-id"])
def test_tokenize_errors(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


# -- the prefix cache per API key ---------------------------------------------------------


def _prefix_cache(client) -> tuple[float, float]:
    """vLLM's prefix-cache (hits, queries) counters, in tokens."""
    samples = _samples(client)
    return tuple(sum(v for (name, _), v in samples.items() if name == f"vllm:prefix_cache_{kind}_total")
                 for kind in ("hits", "queries"))


def test_prefix_cache_is_isolated_per_api_key(server, client, scene_url):
    """The same image chat from another key takes no prefix-cache hit; from
    the same key it does (the salt is a keyed hash of the key)."""
    body = image_chat(scene_url, text="Where is the shape?", max_tokens=1)
    other = {"Authorization": f"Bearer {OTHER_KEY}"}

    def hits_of(headers, **extra) -> float:
        hits, queries = _prefix_cache(client)
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, **extra}, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the engine's stats reach /metrics just after the answer
            now_hits, now_queries = _prefix_cache(client)
            if now_queries >= queries + r.json()["usage"]["prompt_tokens"]:
                return now_hits - hits
            time.sleep(0.05)
        raise AssertionError(f"vLLM's prefix-cache metrics did not count the request: {(hits, queries)} -> "
                             f"{_prefix_cache(client)}, {r.text[:600]}")

    hits_of(AUTH)  # cached for KEY (maybe already)
    assert hits_of(AUTH) > 500  # the image and the text before it
    assert hits_of(other) == 0  # another key: nothing from KEY's cache
    assert hits_of(other) > 500  # its own, now cached
    # A client's own salt splits a key's cache further (and is not the key's salt).
    assert hits_of(AUTH, cache_salt="tenant-a") == 0
    assert hits_of(AUTH, cache_salt="tenant-a") > 500
    assert KEY != OTHER_KEY


@pytest.mark.parametrize("shared", [False, True], ids=["per-key", "shared-across-keys"])
def test_prefix_cache_salt_per_key_unless_shared(shared):
    """Each key's requests get their own salt (a keyed hash, never the key),
    combined with the client's; --share-prefix-cache-across-keys gives every
    key the client's salt as given, as vLLM does."""
    from server.settings import Settings
    from server.state import GatewayState

    state = GatewayState(Settings(model="m", api_key=f"{KEY},{OTHER_KEY}", share_prefix_cache_across_keys=shared))
    salts = {(key, client): state.cache_salt(key, client) for key in (0, 1) for client in (None, "tenant-a")}
    if shared:
        assert salts == {(0, None): None, (1, None): None, (0, "tenant-a"): "tenant-a", (1, "tenant-a"): "tenant-a"}
    else:
        assert len(set(salts.values())) == 4 and None not in salts.values()
        assert not any(KEY in salt or OTHER_KEY in salt or "tenant-a" in salt for salt in salts.values())
        assert state.cache_salt(0, "tenant-a") == salts[(0, "tenant-a")]  # stable: the same key reuses its cache
