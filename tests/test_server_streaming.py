"""Streams and clients that leave, through the shared gateway
(tests/server_fixtures.py): a stream equals the plain answer and ends with
the report; a client that disconnects or stops reading has its request
aborted in the engine and its slot released."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_fixtures import KEY, _samples, image_chat


def test_streaming_equals_plain_and_reports_last(client, scene_url):
    plain = client.post("/v1/chat/completions", json=image_chat(scene_url, feather={"preset": "feather"})).json()
    body = image_chat(scene_url, feather={"preset": "feather"}, stream=True, stream_options={"include_usage": True})
    events = []
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert chunks[-1]["feather"] == plain["feather"]
    assert any(c["choices"] and c["choices"][0].get("finish_reason") == "length" for c in chunks)


def test_client_disconnect_aborts_stream(server, client, scene_url):
    # Text only: room for 1000 tokens, which the tiny model takes seconds to generate.
    body = image_chat(None, max_tokens=1000, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for i, line in enumerate(r.iter_lines()):
            assert line != "data: [DONE]"
            if i > 4:
                break  # leave mid-stream
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = client.get("/metrics").text
        running = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
        if running and all(line.endswith(" 0.0") for line in running):
            break
        time.sleep(0.5)
    assert running and all(line.endswith(" 0.0") for line in running), running
    assert "feather_requests_running 0.0" in text


def test_client_disconnect_aborts_plain_request(server, client, scene_url):
    """A non-streamed request whose client leaves is aborted too (status 499
    in the metrics), not generated to the end for nobody."""
    import time

    before = _samples(client).get(("feather_requests_total", (("preset", "default"), ("status", "499"))), 0.0)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=image_chat(None, max_tokens=1000), timeout=1)
    def settled(samples) -> bool:
        gone = samples.get(("feather_requests_total", (("preset", "default"), ("status", "499"))), 0.0) - before
        engine = [v for (name, _), v in samples.items() if name == "vllm:num_requests_running"]
        return gone == 1 and samples[("feather_requests_running", ())] == 0 and engine and not any(engine)

    deadline = time.monotonic() + 30
    while not settled(samples := _samples(client)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert settled(samples), samples
    assert client.post("/v1/chat/completions", json=image_chat(scene_url)).status_code == 200


def _metric(client, name: str) -> list[float]:
    return [v for (n, _), v in _samples(client).items() if n == name]


def test_stalled_stream_client_releases_its_slot(server, client):
    """A client that stays connected but stops reading: once the server
    cannot send for --stream-send-timeout-s (3 s here), the stream ends and
    the request is aborted in the engine; the slot does not stay taken."""
    import socket
    import time

    # Chunks with 20 logprobs each (~3 kB): more than the socket buffers
    # (the kernel's send buffer grows to 4 MB) hold before the answer ends.
    body = json.dumps(image_chat(None, max_tokens=900, stream=True, n=8, temperature=1.0, ignore_eos=True,
                                 logprobs=True, top_logprobs=20)).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(2)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if "read nothing for 3.0 s" in server.logs():
                break
            time.sleep(0.5)
        assert "read nothing for 3.0 s" in server.logs()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            engine = _metric(client, "vllm:num_requests_running") + _metric(client, "vllm:num_requests_waiting")
            if _metric(client, "feather_requests_running") == [0] and _metric(
                    client, "feather_requests_waiting") == [0] and not any(engine):
                break
            time.sleep(0.5)
        assert _metric(client, "feather_requests_running") == [0] and not any(engine), engine
    finally:
        sock.close()


def test_tokens_without_text_stream_their_logprobs(client, scene_url):
    """Every sampled token's logprobs reach a stream, the ones whose text is
    empty (here forced: BOS, a special token) included, as vLLM streams them."""
    body = image_chat(scene_url, stream=True, logprobs=True, max_tokens=4, ignore_eos=True,
                      logit_bias={"1": 100}, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    entries = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
               for e in c["choices"][0]["logprobs"]["content"]]
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert [e["token"] for e in entries] == ["<s>"] * 4
