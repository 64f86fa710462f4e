"""Graceful shutdown through the real gateway process (vLLM's
--shutdown-timeout, server/app.py `Drain`): SIGTERM while streams run lets
them finish, token for token, while /health answers 503, /live 200 and new
requests 503 with Retry-After; the process then exits 0. With a short
--shutdown-timeout the streams left are aborted cleanly (finish_reason
"abort" and an error event) and a plain request gets a 503 error body, and
the process still exits 0; a second SIGTERM does the same at once, to
requests queued in the engine too. While requests queue, the KV demand
gauges count the blocks they will need at their pruning settings.

One gateway per test: each ends with its process gone. The first runs one
sequence at a time and without prefix caching: the tiny random model's
greedy answers are near ties that a different batch or a cached prefix
flips, and the test compares every token with an undisturbed run; the
requests SIGTERM finds queued must finish too."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess

PROMPTS = ["Count to a hundred.", "Tell a long story.", "Describe the sea."]


def _body(prompt: str, max_tokens: int, stream: bool = True) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream, "logprobs": True,
            "return_tokens_as_token_ids": True}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


class Stream(threading.Thread):
    """One streamed chat completion, read in a thread: its token ids, finish
    reasons, error events, whether [DONE] came, and the time of each chunk."""

    def __init__(self, url: str, prompt: str, max_tokens: int, body: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body or _body(prompt, max_tokens)
        self.admitted = threading.Event()
        self.started = threading.Event()  # its first event came (the engine runs it)
        self.tokens: list[str] = []
        self.finish_reasons: list[str] = []
        self.errors: list[dict] = []
        self.done = False
        self.usage: dict | None = None
        self.text = ""
        self.times: list[float] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=self.body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                self.admitted.set()  # the headers: the gateway took it
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    self.times.append(time.monotonic())
                    self.started.set()
                    if data == "[DONE]":
                        self.done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        self.errors.append(event["error"])
                        continue
                    self.usage = event.get("usage") or self.usage
                    for choice in event["choices"]:
                        self.text += (choice.get("delta") or {}).get("content") or ""
                        for entry in (choice.get("logprobs") or {}).get("content") or ():
                            self.tokens.append(entry["token"])
                        if choice.get("finish_reason"):
                            self.finish_reasons.append(choice["finish_reason"])
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.failure = e
        finally:
            self.admitted.set()
            self.started.set()


def _taken(server: ServerProcess) -> float:
    """Chat completions the gateway has taken so far: waiting for their first
    token, generating, or answered (200)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = re.findall(r"^feather_requests_(?:waiting|running) (\S+)$", text, re.MULTILINE)
    values += re.findall(r'^feather_requests_total\{status="200",preset="[^"]*"\} (\S+)$', text, re.MULTILINE)
    return sum(float(v) for v in values)


def _start_streams(server: ServerProcess, max_tokens: int, also: int = 0,
                   before: float | None = None) -> list[Stream]:
    """Starts the streams; returns once the gateway has taken them all, and
    `also` requests the caller sent since `_taken` was `before`."""
    before = _taken(server) if before is None else before
    streams = [Stream(server.url, p, max_tokens) for p in PROMPTS]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 60
    while _taken(server) < before + len(streams) + also:
        assert time.monotonic() < deadline, "the streams were not all admitted"
        assert not any(s.failure for s in streams), [s.failure for s in streams]
        time.sleep(0.05)
    return streams


class Plain(threading.Thread):
    """One chat completion not streamed, posted in a thread."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.response: httpx.Response | None = None

    def run(self) -> None:
        self.response = httpx.post(self.url + "/v1/chat/completions", json=self.body, timeout=120)


def _assert_shutdown_error(response: httpx.Response) -> None:
    """The clean answer of a plain request aborted at shutdown: 503, OpenAI error JSON, Retry-After."""
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    assert response.json() == {"error": {
        "message": "the server shut down before the answer was complete; retry on another instance",
        "type": "service_unavailable", "param": None, "code": "server_shutdown"}}


def _assert_aborted_stream(s: Stream) -> None:
    """A stream aborted at shutdown says so: finish_reason "abort", one error event, [DONE], no usage."""
    assert s.failure is None, s.failure
    assert s.finish_reasons == ["abort"]
    assert [e["code"] for e in s.errors] == ["server_shutdown"]
    assert s.done and s.usage is None


def _metric_values(server: ServerProcess) -> dict[str, float]:
    """The gateway's unlabelled samples (and vLLM's KV usage, engine 0)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {name: float(v) for name, v in re.findall(r"^(feather_\w+) (\S+)$", text, re.MULTILINE)}
    usage = re.search(r'^vllm:kv_cache_usage_perc\{[^}]*engine="0"[^}]*\} (\S+)$', text, re.MULTILINE)
    values["vllm:kv_cache_usage_perc"] = float(usage.group(1))
    return values


@pytest.fixture
def gateways():
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()


def test_sigterm_drains_running_streams_then_exits_0(tiny_checkpoint, gateways):
    max_tokens = 150  # a few seconds for the four requests taken before SIGTERM
    # Computed exactly as the undisturbed runs (see the module's docstring); the default drain timeout.
    server = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--max-num-seqs", "1",
                           "--no-enable-prefix-caching")
    gateways.append(server)
    for prompt in PROMPTS:  # warm-up: the first answers after start-up were seen to differ from later ones
        warm_up = Stream(server.url, prompt, 16)
        warm_up.run()
        assert warm_up.failure is None and warm_up.done, warm_up.failure
    reference, reference_texts = [], []
    for prompt in PROMPTS:  # undisturbed runs, one at a time
        s = Stream(server.url, prompt, max_tokens)
        s.run()
        assert s.failure is None and s.done and s.finish_reasons == ["length"], (s.failure, s.finish_reasons)
        assert s.usage["completion_tokens"] == max_tokens, s.usage
        reference.append(s.tokens)
        reference_texts.append(s.text)
    assert all(tokens for tokens in reference), [len(t) for t in reference]

    plain: dict = {}  # a request not streamed, admitted before SIGTERM too
    poster = threading.Thread(target=lambda: plain.update(response=httpx.post(
        server.url + "/v1/chat/completions", json=_body(PROMPTS[0], max_tokens, stream=False), timeout=120)))
    before = _taken(server)
    poster.start()
    streams = _start_streams(server, max_tokens, also=1, before=before)
    server.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.headers.get("retry-after"), health.text
        assert client.get("/live").status_code == 200
        refused = client.post("/v1/chat/completions", json=_body(PROMPTS[0], 4, stream=False))
        assert refused.status_code == 503, refused.text
        assert refused.headers.get("retry-after")
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert refused.json()["error"]["type"] == "service_unavailable"
        metrics = client.get("/metrics").text
        assert "feather_draining 1.0" in metrics
        assert 'feather_http_responses_total{handler="live",status="200"}' in metrics
    for s in streams:
        s.join(60)
        assert not s.is_alive()
    poster.join(60)
    code = server.proc.wait(30)
    elapsed = time.monotonic() - sent_at
    assert code == 0, server.logs()[-3000:]
    assert elapsed < 60
    for s, tokens in zip(streams, reference):
        assert s.failure is None, s.failure
        assert s.errors == [] and s.done
        assert s.finish_reasons == ["length"]
        assert s.usage["completion_tokens"] == max_tokens
        assert s.tokens == tokens  # every token, as undisturbed
    answer = plain["response"]
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == max_tokens
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert answer.json()["choices"][0]["message"]["content"] == reference_texts[0]
    drained = re.search(r"draining (\d+) request", server.logs())
    assert drained and int(drained.group(1)) >= 2  # SIGTERM found them running or queued
    assert max(s.times[-1] for s in streams) > sent_at + 0.5  # they ran on well after SIGTERM
    assert "aborted unfinished at shutdown" not in server.logs()


def test_drain_timeout_aborts_streams_cleanly_then_exits_0(tiny_checkpoint, gateways):
    server = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--shutdown-timeout", "1")
    gateways.append(server)
    before = _taken(server)
    plain = Plain(server.url, _body(PROMPTS[1], 900, stream=False))  # in flight when the drain ends, too
    plain.start()
    streams = _start_streams(server, 900, also=1, before=before)  # far longer than the 1 s drain
    for s in streams:
        assert s.started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    for s in streams:
        s.join(60)
        assert not s.is_alive()
    plain.join(60)
    code = server.proc.wait(30)
    assert code == 0, server.logs()[-3000:]
    assert time.monotonic() - sent_at < 30
    for s in streams:
        _assert_aborted_stream(s)
        assert 0 < len(s.tokens)  # cut after some tokens, and says so
    _assert_shutdown_error(plain.response)
    assert server.logs().count("aborted unfinished at shutdown (timeout)") == len(streams) + 1


def test_second_sigterm_aborts_running_and_queued_requests_then_exits_0(tiny_checkpoint, gateways):
    """The default (long) drain, cut short by a second SIGTERM: the running
    stream, a stream and a plain request still queued in the engine (one
    sequence at a time) all end cleanly at once. While they queue, the KV
    demand gauges count their prompts' blocks at their presets."""
    from feather_vllm.pruning import config as pcfg
    from loadtest.generator import LoadConfig, chat_body, synthetic_image_url
    from feather_vllm.pruning.layout import LayoutRule
    from server.kv_demand import KVPool, request_blocks

    server = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--max-num-seqs", "1")
    gateways.append(server)
    running = Stream(server.url, PROMPTS[0], 900)
    running.start()
    assert running.started.wait(60)
    image = LoadConfig(url=server.url, model="tiny", max_tokens=8)  # 591-token image chats (576 image tokens)
    before = _taken(server)
    queued = Stream(server.url, "", 0, body=chat_body(image, synthetic_image_url(336, 0), "feather"))
    queued.start()
    plain = Plain(server.url, {**chat_body(image, synthetic_image_url(336, 1), "none"), "stream": False,
                               "stream_options": None})
    plain.start()
    deadline = time.monotonic() + 60
    while _taken(server) < before + 2:
        assert time.monotonic() < deadline, "the queued requests were not admitted"
        time.sleep(0.05)

    values = _metric_values(server)
    assert not running.finish_reasons  # the two still wait behind it
    assert values["feather_requests_waiting"] == 2
    total = int(values["feather_kv_total_blocks"])
    # The gateway's CPU block size (32); the tiny checkpoint's 336-pixel, 14-pixel-patch tower.
    pool = KVPool.build(32, pcfg.kv_boundaries(None, 32), 32, total + 1, LayoutRule("llava", 336, 14))
    # Their prompts at the stages' upper bounds: 8 groups x 19 blocks unpruned; feather 2 x 19 + 2 x 10 + 4 x 1.
    expected = [request_blocks(pool, pcfg.PRESETS[p], [576], 591) for p in ("none", "feather")]
    assert expected == [152, 62]
    assert values["feather_kv_demand_blocks"] == sum(expected)
    used = round(values["vllm:kv_cache_usage_perc"] * total)
    assert used > 0 and values["feather_kv_free_blocks"] == total - used  # the running stream's blocks
    assert values["feather_kv_demand_ratio"] == pytest.approx((used + sum(expected)) / total)

    server.proc.send_signal(signal.SIGTERM)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 503
    time.sleep(0.5)
    assert running.is_alive() and not running.finish_reasons  # draining: it runs on
    server.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    for thread in (running, queued, plain):
        thread.join(30)
        assert not thread.is_alive()
    code = server.proc.wait(30)
    assert code == 0, server.logs()[-3000:]
    assert time.monotonic() - sent_at < 15  # not the 600 s drain
    _assert_aborted_stream(running)
    assert 0 < len(running.tokens) < 900
    _assert_aborted_stream(queued)
    assert queued.tokens == [] and queued.text == ""  # never ran: no token, yet a clean end
    _assert_shutdown_error(plain.response)
    assert server.logs().count("aborted unfinished at shutdown (signal)") == 3
