"""The load generator against the real gateway: closed and open loop, preset
mixes, bounds, and figures that agree with the server's own metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from loadtest.generator import LoadConfig, run_load, summarize, summarize_by_preset
from loadtest.plots import plot_latency_vs_load, plot_presets
from tests.helpers import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    proc = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--max-num-seqs", "8")
    yield proc
    proc.stop()


def _ttft_count(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == "feather_time_to_first_token_seconds_count":
                total += s.value
    return total


def test_closed_loop_with_preset_mix(server, tmp_path):
    before = _ttft_count(server.url)
    cfg = LoadConfig(url=server.url, model="tiny", presets=["none", "feather"], requests=8, concurrency=4,
                     max_tokens=6)
    results = asyncio.run(run_load(cfg, progress=False))
    assert len(results) == 8 and all(r.ok for r in results), [r.error for r in results]
    assert all(r.output_tokens == 6 and r.prompt_tokens == 591 for r in results)
    assert all(0 < r.ttft <= r.e2e and len(r.itls) >= 1 for r in results)
    assert sorted(r.preset for r in results) == ["feather"] * 4 + ["none"] * 4
    assert all(r.feather["preset"] == r.preset for r in results)
    assert _ttft_count(server.url) - before == 8  # the server saw exactly these requests
    s = summarize(results, slo_ttft_s=1e9, slo_tpot_s=1e9)
    assert s["completed"] == 8 and s["errors"] == {}
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    assert s["output_token_throughput"] == pytest.approx(48 / s["duration_s"])
    assert s["ttft_s"]["p50"] <= s["ttft_s"]["p90"] <= s["ttft_s"]["p99"]
    strict = summarize(results, slo_ttft_s=0.0)
    assert strict["goodput"] == 0
    by = summarize_by_preset(results)
    assert set(by) == {"none", "feather"} and by["none"]["completed"] == 4
    plot_presets(by, tmp_path / "presets.png", "test")
    plot_latency_vs_load({p: [(4, by[p])] for p in by}, tmp_path / "load.png", "test")
    assert (tmp_path / "presets.png").stat().st_size > 1000 and (tmp_path / "load.png").stat().st_size > 1000


def test_open_loop_and_bounds(server):
    cfg = LoadConfig(url=server.url, model="tiny", requests=5, rate=20.0, concurrency=None, max_tokens=3)
    results = asyncio.run(run_load(cfg, progress=False))
    assert len(results) == 5 and all(r.ok for r in results)
    starts = [r.start for r in results]
    assert starts == sorted(starts) and starts[-1] > 0
    bounded = LoadConfig(url=server.url, model="tiny", requests=10_000, duration_s=1.0, concurrency=2, max_tokens=2)
    results = asyncio.run(run_load(bounded, progress=False))
    assert 0 < len(results) < 10_000 and max(r.start for r in results) <= 1.0


def test_errors_are_counted_not_raised(server):
    cfg = LoadConfig(url=server.url, model="no-such-model", requests=3, concurrency=3, max_tokens=2)
    results = asyncio.run(run_load(cfg, progress=False))
    assert [r.status for r in results] == [404] * 3
    assert summarize(results)["errors"] == {"404": 3}


# -- the localization evaluation, end to end through the gateway ---------------

def test_evaluate_builtin_scenes_through_gateway(server, tmp_path):
    from feather_vllm.tools.evaluate import main

    out = tmp_path / "eval.json"
    main(["--url", server.url, "--model", "tiny", "--scenes", "6", "--presets", "none,feather",
          "--stages", '[{"layer": 8, "keep": 0.2, "criterion": "rope"}]', "--json", str(out),
          "--png", str(tmp_path / "eval.png")])
    data = json.loads(out.read_text())
    report = data["report"]
    assert data["items"] == 6 and set(report) == {"none", "feather", "stages1"}
    for name, entry in report.items():
        assert entry["n"] == 6 and 0 <= entry["accuracy"] <= 1
        assert sum(r["n"] for r in entry["by_row"].values()) == 6
    assert report["none"]["stages"] == [] and "vs_none" not in report["none"]
    feather = report["feather"]
    assert [s["layer"] for s in feather["stages"]] == [8, 16]
    assert 172 <= feather["stages"][0]["kept"] <= 236 and 0 <= feather["stages"][0]["mean_row"] <= 1
    assert feather["vs_none"]["difference"] == pytest.approx(feather["accuracy"] - report["none"]["accuracy"])
    assert [s["layer"] for s in report["stages1"]["stages"]] == [8]
    # Kept-token maps of the first 3 scenes: per pruned setting, how many
    # stages each of the 576 tokens survived, consistent with the kept counts.
    assert len(data["maps"]) == 3
    for scene, reply in zip(data["maps"], data["answers"]["feather"]):
        assert set(scene["panels"]) == {"feather", "stages1"}
        panel = scene["panels"]["feather"]
        assert panel["reply"] == reply["reply"] and panel["stages"] == 2 and len(panel["survived"]) == 576
        assert [sum(n >= k for n in panel["survived"]) for k in (1, 2)] == panel["kept"]
        assert 172 <= panel["kept"][0] <= 236
        assert scene["panels"]["stages1"]["kept"] == [115]  # int(576 * 0.2)
    assert (tmp_path / "eval.png").stat().st_size > 1000


def test_evaluate_refcoco_jsonl(server, tmp_path):
    from PIL import Image

    from feather_vllm.tools.evaluate import evaluate, jsonl_items, summarize

    Image.new("RGB", (336, 336), (120, 120, 120)).save(tmp_path / "a.png")
    Image.new("RGB", (400, 300), (90, 140, 90)).save(tmp_path / "b.png")
    (tmp_path / "refs.jsonl").write_text(
        json.dumps({"image": "a.png", "expression": "the grey wall", "box": [0, 0, 168, 336]}) + "\n"
        + json.dumps({"image": str(tmp_path / "b.png"), "expression": "the lawn", "box": [0, 200, 400, 300]}) + "\n")
    items = jsonl_items(tmp_path / "refs.jsonl")
    assert [i["row"] for i in items] == ["middle", "bottom"] and items[1]["size"] == (400, 300)
    answers = asyncio.run(evaluate(server.url, "tiny", items, {"none": {"preset": "none"}}, max_tokens=16))
    report = summarize(items, answers)
    assert report["none"]["n"] == 2 and len(answers["none"]) == 2
    assert all(isinstance(a["reply"], str) for a in answers["none"])


def test_answer_parsing():
    from feather_vllm.tools.evaluate import iou, parse_box, parse_cell

    assert parse_cell("top-left") == 0 and parse_cell("It is at the Bottom Right.") == 8
    assert parse_cell("center") == 4 and parse_cell("middle-left, then center") == 3
    assert parse_cell("top-centre") == 1 and parse_cell("no idea") is None
    assert parse_box("[0.1, 0.2, 0.5, 0.6]", 100, 200) == (10.0, 40.0, 50.0, 120.0)
    assert parse_box("x1=50 y1=20 x2=10 y2=80", 100, 100) == (10.0, 20.0, 50.0, 80.0)
    assert parse_box("maybe 3", 100, 100) is None
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0


def test_kv_capacity_measures_blocks_from_the_engine(tiny_checkpoint):
    """loadtest.kv_capacity on the tiny checkpoint (few requests): each
    preset's blocks are the engine's report, unpruned holds stock vLLM's
    (one block per 32 tokens of prompt and answer in each of the 8 groups)."""
    import math

    from loadtest.kv_capacity import measure, report

    results = measure(str(tiny_checkpoint), kv_cache_mib=64, block_size=32, requests=3, max_tokens=2)
    presets = results["presets"]
    assert list(presets) == ["none", "fastv", "feather", "pyramiddrop"]
    assert presets["none"]["blocks_per_group"] == [math.ceil((591 + 1) / 32)] * 8
    assert all(presets[p]["blocks"] < presets["none"]["blocks"] for p in ("fastv", "feather", "pyramiddrop"))
    assert all(r["max_concurrent"] >= 1 for r in presets.values())
    assert "feather" in report(results)
