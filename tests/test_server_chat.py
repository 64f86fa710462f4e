"""Chats through the shared gateway (tests/server_fixtures.py) with the real
engine: health and models, images per preset with their reports equal to
vLLM's offline engine, kept indices, text chats, sampling options and
logprobs, file URLs, and the official OpenAI client."""

from __future__ import annotations

import pytest

from feather_vllm.pruning.config import resolve
from tests.server_fixtures import KEY, PRESETS, QUESTION, image_chat


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
    # The engine's block counts: the CPU block size the pruning overrides set
    # (32), 8 KV groups of 4 layers; 591 + 7 tokens unpruned are 19 blocks in each.
    blocks = report["kv_blocks"]
    assert blocks == offline_texts[preset, "blocks"]
    assert blocks["unpruned"] == 8 * 19 and len(blocks["held_per_group"]) == 8
    assert (blocks["used"] < blocks["unpruned"]) == (preset != "none")


def test_cut_inside_a_kv_stage_saves_kv_from_the_next_stage(client, scene_url):
    """Layer 5 is inside the KV stage [4, 8): the cut holds, layers 5-7 keep
    full-length blocks, and every stage from layer 8 on holds 15 text +
    288 image + 7 generated tokens (10 blocks of 32 instead of 19)."""
    r = client.post("/v1/chat/completions",
                    json=image_chat(scene_url, feather={"stages": [{"layer": 5, "keep": 0.5}]}))
    assert r.status_code == 200, r.text
    report = r.json()["feather"]
    assert [(s["layer"], s["kept"]) for s in report["stages"]] == [(5, 288)]
    assert report["kv_blocks"]["held_per_group"] == [19, 19, 10, 10, 10, 10, 10, 10] and report["fallback"] is None


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


def test_file_url_inside_allowed_dir(client, server, offline_texts):
    r = client.post("/v1/chat/completions", json=image_chat(f"file://{server.local_dir}/scene.png"))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == offline_texts["none"]


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
