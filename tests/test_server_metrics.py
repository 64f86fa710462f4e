"""/metrics of the shared gateway (tests/server_fixtures.py): the feather_*
series follow requests next to vLLM's own, the dashboard and alert rules
name exported series only, and request contents never grow the label set."""

from __future__ import annotations

import json

from tests.server_fixtures import _samples, image_chat


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
