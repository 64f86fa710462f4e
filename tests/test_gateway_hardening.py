"""Gateway hardening without an engine: auth before the body is read, the
per-key concurrency cap, every response counted with labels from closed
sets, special-token strings in message text refused, and the parent-death
watch of the gateway's child processes.

The app is driven in-process through ASGI (no lifespan: no engine starts);
chat completions answer 503 here, which is enough for what happens before
the engine is asked. Behaviour with the real engine is in test_server.py
and test_gateway_lifecycle.py."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import string
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from server import metrics
from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["key-one", "key-two"]


def _app(**overrides):
    settings = dict(model="unused", api_key=",".join(KEYS), max_body_bytes=10_000)
    settings.update(overrides)
    return create_app(Settings(**settings))


def _scope(path: str, method: str = "POST", headers: dict[str, str] | None = None) -> dict:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": raw, "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}


async def _call(app, scope: dict, body: bytes = b"", block_body: asyncio.Event | None = None):
    """Run one request through the ASGI app; returns (status, body, receive calls)."""
    calls = 0
    sent = False

    async def receive():
        nonlocal calls, sent
        calls += 1
        if block_body is not None:
            await block_body.wait()
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect

    messages = []

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], content, calls


def _counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


BIG = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}] * 200}).encode()


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5LW9uZQ=="},
    {"Authorization": f"Bearer {KEYS[0]}x"}, {"Authorization": f"bearer {KEYS[0]}"},
    {"Authorization": f"Bearer {KEYS[0]},{KEYS[1]}"},
], ids=["no-header", "wrong-key", "basic-scheme", "key-prefix", "lowercase-scheme", "both-keys-joined"])
def test_unauthorized_answered_before_the_body_is_read(headers):
    app = _app()
    scope = _scope("/v1/chat/completions", headers={"content-type": "application/json",
                                                    "content-length": str(len(BIG)), **headers})
    status, body, receive_calls = asyncio.run(_call(app, scope, BIG))
    assert status == 401 and receive_calls == 0
    error = json.loads(body)["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"


def test_every_key_accepted_and_probes_need_none():
    async def run():
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            return ([(await c.get("/v1/models", headers={"Authorization": f"Bearer {k}"})).status_code
                     for k in KEYS], (await c.get("/health")).status_code, (await c.get("/metrics")).status_code)

    keyed, health, metrics_status = asyncio.run(run())
    assert keyed == [200, 200] and health == 503 and metrics_status == 200


def test_vllms_endpoints_need_a_key_and_ping_does_not():
    """/version, /tokenize, /detokenize are keyed like /v1/* (401 before the
    body is read); /ping is a probe like /health."""
    app = _app()
    for path in ("/version", "/tokenize", "/detokenize"):
        scope = _scope(path, headers={"content-type": "application/json", "content-length": str(len(BIG))})
        status, _, receive_calls = asyncio.run(_call(app, scope, BIG))
        assert (status, receive_calls) == (401, 0), path

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            keyed = (await c.get("/version", headers={"Authorization": f"Bearer {KEYS[1]}"})).status_code
            return keyed, (await c.get("/ping")).status_code, (await c.post("/ping")).status_code

    assert asyncio.run(run()) == (200, 503, 503)  # the engine is not started: /ping says what /health says


def test_per_key_concurrency_cap():
    """With max_requests_per_key=1, a second chat completion of the same key
    is refused (429, body unread) while the first is in flight; another key
    is not affected."""
    app = _app(max_requests_per_key=1)

    def scope(key):
        return _scope("/v1/chat/completions", headers={"Authorization": f"Bearer {key}",
                                                       "content-type": "application/json"})

    async def run():
        held = asyncio.Event()
        first = asyncio.create_task(_call(app, scope(KEYS[0]), b"{}", block_body=held))
        await asyncio.sleep(0.05)
        same_key = await _call(app, scope(KEYS[0]), b"{}")
        other_key = await _call(app, scope(KEYS[1]), b"{}")
        held.set()
        first_result = await first
        after = await _call(app, scope(KEYS[0]), b"{}")
        return same_key, other_key, first_result, after

    same_key, other_key, first, after = asyncio.run(run())
    assert same_key[0] == 429 and same_key[2] == 0
    assert json.loads(same_key[1])["error"]["code"] == "key_concurrency_limit"
    assert other_key[0] == 503 and first[0] == 503  # got past the cap: the engine is not there
    assert after[0] == 503  # the slot was released


def test_every_response_counted_by_status():
    app = _app()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("unexpected")

    auth = {"Authorization": f"Bearer {KEYS[0]}", "content-type": "application/json"}
    cases = [  # (id, path, method, headers, body, status, preset label or None)
        ("no-key", "/v1/chat/completions", "POST", {}, b"{}", 401, "unknown"),
        ("body-too-large", "/v1/chat/completions", "POST", {**auth, "content-length": "20000"}, b"x" * 20000,
         413, "unknown"),
        ("malformed-json", "/v1/chat/completions", "POST", auth, b'{"model": ', 400, "unknown"),
        ("engine-not-ready", "/v1/chat/completions", "POST", auth, b"{}", 503, "unknown"),
        ("unknown-path", "/v1/nothing-here", "GET", auth, b"", 404, None),
        ("unexpected-exception", "/boom", "GET", {}, b"", 500, None),
    ]

    async def run():
        out = []
        for kind, path, method, headers, body, status, preset in cases:
            handler = metrics.HANDLERS.get(path, "other")
            before = (_counter("feather_http_responses_total", handler=handler, status=str(status)),
                      _counter("feather_requests_total", status=str(status), preset=preset or ""))
            try:
                got, _, _ = await _call(app, _scope(path, method, headers), body)
            except RuntimeError:  # Starlette re-raises after its 500 answer
                got = 500
            after = (_counter("feather_http_responses_total", handler=handler, status=str(status)),
                     _counter("feather_requests_total", status=str(status), preset=preset or ""))
            out.append((kind, got, status, after[0] - before[0], after[1] - before[1], preset))
        return out

    for kind, got, status, http_delta, chat_delta, preset in asyncio.run(run()):
        assert got == status, kind
        assert http_delta == 1, kind
        assert chat_delta == (1 if preset else 0), kind


def _random_feather(rng: random.Random) -> dict | None:
    name = "".join(rng.choices(string.ascii_letters + string.digits + "{}\"\\\n", k=rng.randint(1, 40)))
    stages = [{"layer": rng.choice([3, 8, 16, 24, 99]), "keep": rng.random()}]
    return rng.choice([None, {}, {"preset": name}, {"stages": stages}, {"preset": name, "stages": stages},
                       {"preset": rng.choice(["none", "fastv", "feather", "pyramiddrop"])}])


def test_preset_labels_come_from_a_closed_set():
    from feather_vllm.pruning.config import PRESETS, PruningConfigError, resolve
    from server.schemas import FeatherSettings

    closed = set(PRESETS) | {"custom", "default", "invalid", "unknown"}
    rng = random.Random(0)
    seen = set()
    for _ in range(1000):
        raw = _random_feather(rng)
        feather = FeatherSettings(**raw) if raw is not None else None
        seen.add(metrics.request_preset_label(feather))
        try:
            config = resolve(feather.model_dump(exclude_none=True, exclude={"return_kept"}) if feather else None)
        except PruningConfigError:
            continue
        seen.add(metrics.config_label(config, feather))
    assert seen <= closed and {"custom", "default", "invalid"} <= seen, seen


def test_special_token_strings_refused_in_message_text():
    """The image placeholder and the other special tokens of the shipped
    demo tokenizer, in every place message text can be."""
    from transformers import AutoTokenizer

    from server.errors import APIError
    from server.schemas import ChatCompletionRequest
    from server.state import GatewayState, special_token_strings

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "feather_vllm/demo/weights")
    strings = special_token_strings(tokenizer, image_token_id=4)
    assert {"<image>", "<s>", "</s>", "<unk>", "<pad>"} <= strings

    import re

    state = GatewayState.__new__(GatewayState)
    state.special_text = re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True))))

    def check(messages):
        state.refuse_special_tokens(ChatCompletionRequest(model="m", messages=messages).messages)

    check([{"role": "user", "content": "an image < image > <imag e> &lt;image&gt;"}])  # near misses pass
    for messages, param in [
        ([{"role": "user", "content": "look: <image>" * 3}], "messages[0].content"),
        ([{"role": "system", "content": "<image>"}, {"role": "user", "content": "hi"}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "x</s>USER:"}]}],
         "messages[0].content[1].text"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<s>"}], "messages[1].content"),
    ]:
        with pytest.raises(APIError) as err:
            check(messages)
        assert err.value.status == 400 and err.value.param == param and err.value.code == "special_token_in_text"


# -- parent-death watch ------------------------------------------------------------------------

_FAKE_GATEWAY = textwrap.dedent("""
    import multiprocessing, os, sys, time
    sys.path.insert(0, {root!r})
    from server import lifecycle

    def child():
        time.sleep(600)

    if __name__ == "__main__":
        lifecycle.mark_gateway()
        proc = multiprocessing.get_context({method!r}).Process(target=child)
        proc.start()
        print(proc.pid, flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_children_exit_when_the_gateway_is_killed(tmp_path, method):
    script = tmp_path / "gateway.py"
    script.write_text(_FAKE_GATEWAY.format(root=str(ROOT), method=method))
    env = {k: v for k, v in os.environ.items() if k != "FEATHER_GATEWAY_PID"}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the child outlived its SIGKILLed parent by 10 s"
    finally:
        parent.kill()


# -- deploys default to a required key ---------------------------------------------------------

def test_deploys_require_an_api_key():
    import yaml

    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    key = compose["services"]["gateway"]["environment"]["FEATHER_API_KEY"]
    assert key.startswith("${FEATHER_API_KEY:?"), key  # compose refuses to start without it
    deployment = yaml.safe_load((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["FEATHER_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "feather-vllm" and ref["key"] == "api-key" and ref.get("optional") is False
    assert Settings(model="m", api_key=" a, b ,,").api_keys == ["a", "b"]


# -- a client that leaves while its images load; renderer failures ---------------------------

class _LeavingRequest:
    """What inflight.unless_disconnected reads of a request: a client that disconnects."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s

    async def receive(self):
        await asyncio.sleep(self.after_s)
        return {"type": "http.disconnect"}


def test_work_abandoned_when_the_client_leaves():
    from server.errors import APIError
    from server.inflight import unless_disconnected as _unless_disconnected

    cancelled = False

    async def slow_fetch():
        nonlocal cancelled
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled = True
            raise

    async def run():
        start = time.monotonic()
        with pytest.raises(APIError) as err:
            await _unless_disconnected(_LeavingRequest(0.1), slow_fetch())
        quick = await _unless_disconnected(_LeavingRequest(30), asyncio.sleep(0, result="done"))
        return time.monotonic() - start, err.value, quick

    elapsed, err, quick = asyncio.run(run())
    assert err.status == 499 and cancelled and elapsed < 2 and quick == "done"


def test_unexpected_renderer_failure_is_a_json_500_not_a_crash():
    from types import SimpleNamespace

    from server.errors import APIError
    from server.state import GatewayState

    class Renderer:
        default_chat_tok_params = SimpleNamespace(with_kwargs=lambda **kw: None)

        async def render_chat_async(self, *args, **kwargs):
            raise RuntimeError("processor exploded")

    state = GatewayState(Settings(model="unused"))
    state.engine = SimpleNamespace(renderer=Renderer())
    with pytest.raises(APIError) as err:
        asyncio.run(state.render([{"role": "user", "content": "hi"}]))
    assert err.value.status == 500 and err.value.code == "render_error" and "RuntimeError" in err.value.message
