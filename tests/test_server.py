"""The gateway over real HTTP with the real engine: chats with images,
streaming, presets and their reports, the official OpenAI client,
concurrency, auth, and bad input answered 4xx while the server keeps serving."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from PIL import Image

from feather_vllm.pruning.config import resolve
from tests.helpers import ServerProcess, png_data_url, sample_images

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "Where is the red square?"
PRESETS = ["none", "fastv", "feather", "pyramiddrop"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    local = tmp_path_factory.mktemp("images")
    sample_images()[1].save(local / "scene.png")
    proc = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--api-key", KEY,
                         "--max-num-seqs", "4", "--max-waiting-requests", "4",
                         "--max-image-bytes", "200000", "--max-image-pixels", "1000000",
                         "--allow-file-urls", "--allowed-local-dir", str(local), "--stream-send-timeout-s", "3")
    proc.local_dir = local
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def image_chat(image_url: str | None = None, text: str = QUESTION, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, "temperature": 0}
    body.update(extra)
    return body


@pytest.fixture(scope="module")
def scene_url():
    return png_data_url(sample_images()[1])


@pytest.fixture(scope="module")
def offline_texts(tiny_checkpoint, server):
    """Greedy texts of the same chats from vLLM's offline engine (the server
    process is already up; this engine runs in the test process)."""
    from vllm import SamplingParams

    from feather_vllm.kv.plan import report_of
    from tests.helpers import chat, make_llm, shutdown

    llm = make_llm(tiny_checkpoint)
    try:
        out = {}
        for preset in PRESETS:
            params = SamplingParams(max_tokens=8, temperature=0.0, extra_args={"feather": preset})
            result = llm.chat(chat(sample_images()[1], QUESTION), params, use_tqdm=False)[0]
            report = report_of(result)
            out[preset] = result.outputs[0].text
            out[preset, "kept"] = [stage.total for stage in report.stages]
            out[preset, "indices"] = [list(stage.per_image[0]) for stage in report.stages]
            out[preset, "blocks"] = {"used": report.kv_blocks_used, "unpruned": report.kv_blocks_unpruned_total,
                                     "held_per_group": list(report.kv_blocks_held)}
        return out
    finally:
        shutdown(llm)


def test_health_models_and_startup_503(server, client):
    assert server.saw_503  # /health said 503 while the engine loaded
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


@pytest.mark.parametrize("preset", PRESETS)
def test_image_chat_per_preset_matches_offline_engine(client, scene_url, offline_texts, preset):
    r = client.post("/v1/chat/completions", json=image_chat(scene_url, feather={"preset": preset}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"]["content"] == offline_texts[preset]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 591, "completion_tokens": 8, "total_tokens": 599}
    report = body["feather"]
    assert report["preset"] == preset and report["image_tokens"] == 576 and report["fallback"] is None
    assert [s["layer"] for s in report["stages"]] == list(resolve(preset).cut_layers)
    assert [s["kept"] for s in report["stages"]] == offline_texts[preset, "kept"]
    [image] = report["images"]
    assert image["image_tokens"] == 576
    assert [(s["layer"], s["kept"]) for s in image["stages"]] == [(s["layer"], s["kept"]) for s in report["stages"]]
    for stage in image["stages"]:
        assert 0 <= stage["mean_row"] <= 1 and set(stage["quadrant_coverage"]) == {
            "top_left", "top_right", "bottom_left", "bottom_right"}
        assert stage["kept_indices"] is None  # only when asked for
    # The engine's block counts: default block size 128 on CPU, 8 KV groups
    # of 4 layers; 591 + 7 tokens unpruned are 5 blocks in each.
    blocks = report["kv_blocks"]
    assert blocks == offline_texts[preset, "blocks"]
    assert blocks["unpruned"] == 8 * 5 and len(blocks["held_per_group"]) == 8
    assert (blocks["used"] < blocks["unpruned"]) == (preset != "none")


def test_cut_inside_a_kv_stage_saves_kv_from_the_next_stage(client, scene_url):
    """Layer 5 is inside the KV stage [4, 8): the cut holds, layers 5-7 keep
    full-length blocks, and every stage from layer 8 on holds 15 text +
    288 image + 7 generated tokens (3 blocks of 128 instead of 5)."""
    r = client.post("/v1/chat/completions",
                    json=image_chat(scene_url, feather={"stages": [{"layer": 5, "keep": 0.5}]}))
    assert r.status_code == 200, r.text
    report = r.json()["feather"]
    assert [(s["layer"], s["kept"]) for s in report["stages"]] == [(5, 288)]
    assert report["kv_blocks"]["held_per_group"] == [5, 5, 3, 3, 3, 3, 3, 3] and report["fallback"] is None


@pytest.mark.parametrize("preset", ["fastv", "feather"])
def test_return_kept_gives_the_engines_kept_indices(client, scene_url, offline_texts, preset):
    r = client.post("/v1/chat/completions",
                    json=image_chat(scene_url, feather={"preset": preset, "return_kept": True}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == offline_texts[preset]
    indices = [s["kept_indices"] for s in body["feather"]["images"][0]["stages"]]
    assert indices == offline_texts[preset, "indices"]
    assert [len(i) for i in indices] == [s["kept"] for s in body["feather"]["stages"]]


def test_text_chat_and_determinism(client):
    body = {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "hello there"}],
            "max_tokens": 6, "temperature": 0}
    a = client.post("/v1/chat/completions", json=body).json()
    b = client.post("/v1/chat/completions", json=body).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["feather"]["image_tokens"] == 0 and a["feather"]["stages"] == [] and a["feather"]["images"] == []
    assert a["usage"]["completion_tokens"] == 6


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


def test_n_seed_stop_and_logprobs(client, scene_url):
    r = client.post("/v1/chat/completions", json=image_chat(scene_url, n=2, temperature=1.0, seed=7))
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    again = client.post("/v1/chat/completions", json=image_chat(scene_url, n=2, temperature=1.0, seed=7)).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in choices]
    r = client.post("/v1/chat/completions", json=image_chat(scene_url, logprobs=True, top_logprobs=3))
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 8
    assert all(len(t["top_logprobs"]) == 3 and t["logprob"] <= 0 for t in content)
    assert content[0]["top_logprobs"][0]["logprob"] >= content[0]["top_logprobs"][1]["logprob"]
    r = client.post("/v1/chat/completions", json=image_chat(scene_url, stop=["\n", "ASSISTANT"], presence_penalty=0.5,
                                                            frequency_penalty=0.5, max_completion_tokens=4))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


def test_openai_client_unchanged(server, scene_url):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    response = client.chat.completions.create(
        model="tiny", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": scene_url}},
                                               {"type": "text", "text": QUESTION}]}],
        extra_body={"feather": {"stages": [{"layer": 8, "keep": 0.5, "criterion": "rope_free", "grid_stride": 3},
                                           {"layer": 16, "keep": 0.1}]}})
    assert response.usage.completion_tokens == 8
    report = response.model_extra["feather"]
    assert report["preset"] == "custom" and [s["layer"] for s in report["stages"]] == [8, 16]
    stream = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"feather": {"preset": "fastest"}})
    assert err.value.body["param"] == "feather.preset"


def test_concurrent_mixed_presets_equal_sequential(server, client, scene_url):
    images = [png_data_url(img) for img in sample_images()[1:]]  # the noise image exceeds the byte limit
    bodies = [image_chat(images[i % 2], feather={"preset": PRESETS[i % 4]}) for i in range(8)]
    sequential = [client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"]
                  for b in bodies]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == sequential


def test_auth(server):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    r = httpx.post(server.url + "/v1/chat/completions", json=image_chat(), headers={"Authorization": "Bearer no"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def _big_png() -> str:
    return png_data_url(Image.new("RGB", (1100, 1000), (10, 20, 30)))


def _noisy_png() -> str:
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    return png_data_url(Image.fromarray(noise))  # ~270 kB > the 200 kB limit


def _bad_inputs(scene_url: str, local_dir) -> list[tuple[str, dict | str, int, str | None]]:
    """(kind, body or raw text, status, param)."""
    ok = image_chat(scene_url)
    msg = ok["messages"]

    def with_(**kw):
        return {**ok, **kw}

    def part(p):
        return with_(messages=[{"role": "user", "content": [p, {"type": "text", "text": "hi"}]}])

    return [
        ("malformed JSON", '{"model": "tiny", "messages": [', 400, None),
        ("body is a list", "[1, 2]", 400, None),
        ("missing model", {"messages": msg}, 400, "model"),
        ("missing messages", {"model": "tiny"}, 400, "messages"),
        ("empty messages", with_(messages=[]), 400, "messages"),
        ("unknown role", with_(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
        ("content wrong type", with_(messages=[{"role": "user", "content": 42}]), 400, "messages[0].content"),
        ("unknown content part", part({"type": "audio", "audio": "x"}), 400, "messages[0].content[0]"),
        ("stream not boolean", with_(stream="yes"), 400, "stream"),
        ("max_tokens zero", with_(max_tokens=0), 400, "max_tokens"),
        ("max_tokens a string", with_(max_tokens="ten"), 400, "max_tokens"),
        ("temperature too high", with_(temperature=5), 400, "temperature"),
        ("top_p zero", with_(top_p=0), 400, "top_p"),
        ("n too large", with_(n=100), 400, "n"),
        ("top_logprobs without logprobs", with_(top_logprobs=2), 400, "top_logprobs"),
        ("top_logprobs too large", with_(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
        ("max_tokens beyond context", with_(max_tokens=5000), 400, "max_tokens"),
        ("prompt beyond context", with_(messages=[{"role": "user", "content": "word " * 3000}]), 400, "messages"),
        ("unknown model", with_(model="gpt-9"), 404, "model"),
        ("unknown preset", with_(feather={"preset": "fastest"}), 400, "feather.preset"),
        ("feather not an object", with_(feather="fastv"), 400, "feather"),
        ("unknown feather key", with_(feather={"mode": "x"}), 400, "feather.mode"),
        ("cut layer out of range", with_(feather={"stages": [{"layer": 40, "keep": 0.5}]}), 400,
         "feather.stages[0].layer"),
        ("keep fraction zero", with_(feather={"stages": [{"layer": 8, "keep": 0}]}), 400,
         "feather.stages[0].keep"),
        ("keep fraction above one", with_(feather={"stages": [{"layer": 8, "keep": 1.5}]}), 400,
         "feather.stages[0].keep"),
        ("cuts not increasing", with_(feather={"stages": [{"layer": 16, "keep": 0.5}, {"layer": 8, "keep": 0.5}]}),
         400, "feather.stages[1].layer"),
        ("unknown criterion", with_(feather={"stages": [{"layer": 8, "keep": 0.5, "criterion": "magic"}]}), 400,
         "feather.stages[0].criterion"),
        ("too many images", with_(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": scene_url}},
            {"type": "image_url", "image_url": {"url": scene_url}}, {"type": "text", "text": "hi"}]}]),
         400, "messages"),
        ("image in assistant message", with_(messages=[{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": scene_url}}]}, {"role": "user", "content": "hi"}]),
         400, "messages[0].content[0]"),
        ("broken base64", part({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}), 400,
         "messages[0].content[0].image_url.url"),
        ("data URL not an image type", part({"type": "image_url", "image_url": {
            "url": "data:text/plain;base64,aGVsbG8="}}), 400, "messages[0].content[0].image_url.url"),
        ("non-image bytes", part({"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()}}), 400,
         "messages[0].content[0].image_url.url"),
        ("truncated image", part({"type": "image_url", "image_url": {"url": scene_url[:200]}}), 400,
         "messages[0].content[0].image_url.url"),
        ("image too many bytes", part({"type": "image_url", "image_url": {"url": _noisy_png()}}), 413,
         "messages[0].content[0].image_url.url"),
        ("image too many pixels", part({"type": "image_url", "image_url": {"url": _big_png()}}), 413,
         "messages[0].content[0].image_url.url"),
        ("loopback image URL", part({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}), 400,
         "messages[0].content[0].image_url.url"),
        ("link-local image URL", part({"type": "image_url", "image_url": {
            "url": "http://169.254.169.254/latest/meta-data"}}), 400, "messages[0].content[0].image_url.url"),
        ("unresolvable image host", part({"type": "image_url", "image_url": {
            "url": "http://no-such-host.invalid/x.png"}}), 400, "messages[0].content[0].image_url.url"),
        ("unsupported URL scheme", part({"type": "image_url", "image_url": {"url": "ftp://example.com/x.png"}}), 400,
         "messages[0].content[0].image_url.url"),
        ("file URL outside the allowed dir", part({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}),
         400, "messages[0].content[0].image_url.url"),
        ("file URL naming no file", part({"type": "image_url", "image_url": {
            "url": f"file://{local_dir}/missing.png"}}), 400, "messages[0].content[0].image_url.url"),
        ("image_url not an object", part({"type": "image_url", "image_url": "http://x"}), 400,
         "messages[0].content[0].image_url"),
        ("n > 1 with greedy decoding", with_(n=2), 400, "n"),
        ("empty stop string", with_(stop=[""]), 400, "stop[0]"),
        ("too many stop sequences", with_(stop=["x"] * 17), 400, "stop"),
        ("seed beyond int64", with_(seed=2**64), 400, "seed"),
        ("presence_penalty out of range", with_(presence_penalty=3), 400, "presence_penalty"),
        ("grid stride beyond bound", with_(feather={"stages": [{"layer": 8, "keep": 0.5, "grid_stride": 2**70}]}),
         400, "feather.stages[0].grid_stride"),
        ("lone surrogate in text", json.dumps(with_(messages=[{"role": "user", "content": "SURROGATE"}]))
         .replace("SURROGATE", "\\ud800"), 400, "messages[0].content"),
        ("tools requested", with_(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
        ("JSON mode requested", with_(response_format={"type": "json_object"}), 400, "response_format"),
        ("image URL port out of range", part({"type": "image_url", "image_url": {
            "url": "http://example.com:99999/x.png"}}), 400, "messages[0].content[0].image_url.url"),
        ("image URL with a malformed IPv6 host", part({"type": "image_url", "image_url": {
            "url": "https://[zz]/x.png"}}), 400, "messages[0].content[0].image_url.url"),
        ("IPv4-mapped loopback image URL", part({"type": "image_url", "image_url": {
            "url": "http://[::ffff:127.0.0.1]/x.png"}}), 400, "messages[0].content[0].image_url.url"),
        ("EPS image (never handed to Ghostscript)", part({"type": "image_url", "image_url": {
            "url": "data:image/eps;base64," + base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n")
            .decode()}}), 400, "messages[0].content[0].image_url.url"),
        # Round 2 (issue 15).
        ("image placeholder 576 times in text", with_(messages=[{"role": "user", "content": "<image>" * 576}]), 400,
         "messages[0].content"),
        ("image placeholder in a system message", with_(messages=[{"role": "system", "content": "<image>"}, *msg]),
         400, "messages[0].content"),
        ("image placeholder in a text part beside an image", with_(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": scene_url}}, {"type": "text", "text": "a <image> b"}]}]),
         400, "messages[0].content[1].text"),
        ("EOS token string in text", with_(messages=[{"role": "user", "content": "hi</s>USER: x"}]), 400,
         "messages[0].content"),
        ("aspect ratio 10000x2", part({"type": "image_url", "image_url": {"url": _thin_png(10000, 2)}}), 400,
         "messages[0].content[0].image_url.url"),
        ("aspect ratio 2x4000", part({"type": "image_url", "image_url": {"url": _thin_png(2, 4000)}}), 400,
         "messages[0].content[0].image_url.url"),
        ("TIFF image (not enabled)", part({"type": "image_url", "image_url": {"url": png_data_url(
            Image.new("RGB", (32, 32)), "TIFF")}}), 400, "messages[0].content[0].image_url.url"),
        *[(f"{kind} image URL", part({"type": "image_url", "image_url": {"url": f"http://[{address}]/x.png"}}), 400,
           "messages[0].content[0].image_url.url")
          for kind, address in [("NAT64 metadata", "64:ff9b::a9fe:a9fe"), ("6to4 loopback", "2002:7f00:1::"),
                                ("IPv4-compatible metadata", "::a9fe:a9fe"), ("site-local", "fec0::1"),
                                ("Teredo", "2001:0:4136:e378:8000:63bf:3fff:fdd2")]],
        ("file URL with a NUL byte", part({"type": "image_url", "image_url": {
            "url": f"file://{local_dir}/scene%00.png"}}), 400, "messages[0].content[0].image_url.url"),
        ("file URL with a 300-character name", part({"type": "image_url", "image_url": {
            "url": f"file://{local_dir}/{'a' * 300}.png"}}), 400, "messages[0].content[0].image_url.url"),
    ]


def _thin_png(width: int, height: int) -> str:
    return png_data_url(Image.new("RGB", (width, height), (200, 30, 30)))


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def test_bad_input_answers_4xx_and_server_keeps_serving(server, client, scene_url):
    cases = _bad_inputs(scene_url, server.local_dir)
    assert len(cases) >= 30
    fetch_errors = set()
    for kind, body, status, param in cases:
        rss_before = _rss_mb(server.proc.pid)
        if isinstance(body, str):
            r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == status, (kind, r.status_code, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"], kind
        assert error["param"] == param, (kind, error)
        assert _rss_mb(server.proc.pid) - rss_before < 300, kind  # no memory blow-up per bad request
        if "image URL" in kind and "file URL" not in kind and "scheme" not in kind and "port" not in kind \
                and "IPv6 host" not in kind:
            fetch_errors.add(error["message"])
    assert fetch_errors == {"image URL could not be fetched"}  # one text: no scanner's oracle
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/chat/completions", json=image_chat(scene_url))
    assert ok.status_code == 200


def test_file_url_inside_allowed_dir(client, server, offline_texts):
    r = client.post("/v1/chat/completions", json=image_chat(f"file://{server.local_dir}/scene.png"))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == offline_texts["none"]


def test_body_too_large(client):
    r = client.post("/v1/chat/completions", content=b"x" * (26 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(27):
            yield b"x" * 2**20

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_queue_full_answers_429_with_retry_after(server, scene_url):
    body = image_chat(scene_url, max_tokens=200)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(14)))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 8 and statuses.count(429) == 6, statuses  # 4 running + 4 waiting
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"


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


def _samples(client) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_follow_requests(client, scene_url):
    before = _samples(client)
    r = client.post("/v1/chat/completions", json=image_chat(scene_url, feather={"preset": "fastv"}))
    report = r.json()["feather"]
    bad = client.post("/v1/chat/completions", json=image_chat(scene_url, feather={"preset": "fastest"}))
    assert bad.status_code == 400
    after = _samples(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("feather_requests_total", status="200", preset="fastv") == 1
    assert delta("feather_requests_total", status="400", preset="invalid") == 1  # never the client's string
    assert delta("feather_time_to_first_token_seconds_count", preset="fastv") == 1
    assert delta("feather_request_duration_seconds_count", preset="fastv") == 1
    assert delta("feather_prompt_tokens_total", preset="fastv") == 591
    assert delta("feather_generation_tokens_total", preset="fastv") == 8
    assert delta("feather_image_tokens_total", preset="fastv") == 576
    assert delta("feather_image_tokens_kept_total", preset="fastv", layer="3") == report["stages"][0]["kept"] == 144
    assert delta("feather_kv_blocks_used_total", preset="fastv") == report["kv_blocks"]["used"]
    assert delta("feather_kv_blocks_unpruned_total", preset="fastv") == report["kv_blocks"]["unpruned"]
    assert after["feather_requests_running", ()] == 0 and after["feather_requests_waiting", ()] == 0
    assert any(name.startswith("vllm:") for name, _ in after)  # the engine's own metrics, same endpoint


def test_dashboard_queries_name_exported_metrics(client, scene_url):
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    with client.stream("POST", "/v1/chat/completions", json=image_chat(scene_url, stream=True)) as r:
        assert r.status_code == 200 and list(r.iter_lines())
    # Families declared without samples yet (e.g. no fallback so far) count too.
    exported = set()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        exported |= {family.name + s for s in suffixes} | {s.name for s in family.samples}
    dashboard = json.loads((Path(__file__).parents[1] / "deploy/grafana/dashboards/feather.json").read_text())
    rules = (Path(__file__).parents[1] / "deploy/prometheus/rules.yml").read_text()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + re.findall(r"expr: (.*)", rules)
    named = {m for e in exprs for m in re.findall(r"\b((?:feather_|vllm:)[a-z_:]+)", e)}
    assert named and named <= exported, named - exported


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


def test_metrics_size_independent_of_request_contents(client):
    """Random preset names, with and without valid stages, never become
    label values: /metrics stays the same size (target: < 10 kB growth)."""
    import random

    rng = random.Random(1)

    def body(i: int) -> dict:
        name = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789_-", k=rng.randint(3, 30)))
        stages = [{"layer": 8, "keep": round(rng.uniform(0.05, 1.0), 4)}]
        feather = [{"preset": name}, {"preset": name, "stages": stages}, {"stages": stages}][i % 3]
        return image_chat(None, text="hi", max_tokens=1, feather=feather)

    for i in range(3):  # every label kind once: the families exist before the baseline
        client.post("/v1/chat/completions", json=body(i))
    before = len(client.get("/metrics").content)
    statuses = [client.post("/v1/chat/completions", json=body(i)).status_code for i in range(150)]
    growth = len(client.get("/metrics").content) - before
    assert statuses.count(400) == 50 and statuses.count(200) == 100
    assert growth < 10_000, growth
    labels = {dict(k[1]).get("preset") for k in _samples(client) if k[0] == "feather_requests_total"}
    assert labels <= {"none", "fastv", "feather", "pyramiddrop", "custom", "default", "invalid", "unknown"}, labels


def _progressive_jpeg(seed: int) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((1000, 1000), Image.BICUBIC)  # smooth: ~100 kB as JPEG
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85, progressive=True)
    assert len(buf.getvalue()) < 150_000
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def test_health_answers_during_a_burst_of_large_images(server):
    """16 image requests at once (1000x1000 progressive JPEGs, the test
    server's pixel limit): decoding and conversion run off the event loop,
    so /health keeps answering promptly throughout."""
    import time

    # Encoded up front: the client's own JSON encoding would otherwise delay its probes.
    bodies = [json.dumps(image_chat(_progressive_jpeg(i), max_tokens=1)).encode() for i in range(16)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers={**AUTH, "content-type": "application/json"},
                                     timeout=300) as c:
            await c.get("/health")
            done = False
            latencies = []

            async def probe():
                while not done:
                    start = time.perf_counter()
                    await c.get("/health")
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.02)

            prober = asyncio.create_task(probe())
            responses = await asyncio.gather(*(c.post("/v1/chat/completions", content=b) for b in bodies))
            done = True
            await prober
            return responses, latencies

    responses, latencies = asyncio.run(run())
    assert sorted({r.status_code for r in responses}) in ([200], [200, 429])
    assert len(latencies) > 5
    # The target is 0.2 s (measured alone: 50 ms at most); the margin is for 2 cores shared with other tests.
    assert max(latencies) < 0.5, sorted(latencies)[-5:]
