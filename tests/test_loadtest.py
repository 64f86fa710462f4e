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


def _metric_total(url: str, sample: str, **labels: str) -> float:
    """The gateway's samples named `sample` (with `labels`), summed."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == sample and labels.items() <= s.labels.items():
                total += s.value
    return total


def _ttft_count(url: str) -> float:
    return _metric_total(url, "feather_time_to_first_token_seconds_count")


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


def test_evaluate_multi_turn_through_gateway(server, tmp_path, capsys):
    """--multi-turn on 4 two-object scenes: each setting's turn 1 once, then
    turn 2 about the other object under each follow-up policy (reuse,
    add_back, reselect, keep_both); scores, paired differences and what the reports
    say was reused or kept too agree with the answers; the unpruned
    baseline is stated."""
    from feather_vllm.tools.demo.scenes import held_out_pairs
    from feather_vllm.tools.evaluate import main

    for pair in held_out_pairs(4):  # two objects told apart by colour, by shape and by cell
        a, b = pair.objects
        assert a.cell != b.cell and a.colour != b.colour and a.shape != b.shape and a.image is pair.image
    out = tmp_path / "multi.json"
    main(["--url", server.url, "--model", "tiny", "--multi-turn", "--scenes", "4", "--presets", "none,feather",
          "--json", str(out)])
    data = json.loads(out.read_text())
    names = ["none", "feather+reuse", "feather+add_back", "feather+reselect", "feather+keep_both"]
    assert data["mode"] == "multi-turn" and data["items"] == 4 and data["follow_ups"] is True
    assert list(data["report"]) == names
    assert data["settings"]["feather+keep_both"] == {"preset": "feather", "follow_up": "keep_both"}
    assert data["questions"] == [[o.question for o in p.objects] for p in held_out_pairs(4, data["seed"])]
    answers, report = data["answers"], data["report"]
    for name in names:
        assert len(answers[name]) == 4 and all(len(c) == 2 for c in answers[name])
        for t, entry in enumerate(report[name]["turns"]):
            turns = [c[t] for c in answers[name]]
            assert entry["n"] == 4 and entry["accuracy"] == sum(r["correct"] for r in turns) / 4
            assert entry["other_object"] == sum(r["other"] for r in turns) / 4
            assert not any(r["correct"] and r["other"] for r in turns)
            assert entry["reused"] == sum(bool(r["reused"]) for r in turns)
            assert entry["united"] == sum(bool(r["united"]) for r in turns)
            if name != "none":
                none = [c[t]["correct"] for c in answers["none"]]
                assert entry["vs_none"]["difference"] == pytest.approx(entry["accuracy"] - sum(none) / 4)
        assert all(c[0]["reused"] is None and c[0]["united"] is None for c in answers[name])  # nothing before turn 1
    # One turn 1 per setting: every follow-up continues the same one.
    assert len({json.dumps([c[0] for c in answers[n]]) for n in names[1:]}) == 1
    # What each policy did, by the reports: reuse took turn 1's kept set and
    # KV, add_back too (turn 1's, not another policy's cut of the same
    # turn 2: asked before them) and added to it, reselect cut afresh,
    # keep_both cut keeping turn 1's kept set.
    follow = {n: report[n]["turns"][1] for n in names[1:]}
    assert follow["feather+reuse"]["reused"] == follow["feather+reuse"]["kept_from_turn1"] == 4
    assert follow["feather+add_back"]["reused"] == follow["feather+add_back"]["kept_from_turn1"] == 4
    assert all(c[1]["reused"]["added"] == 172 for c in answers["feather+add_back"])  # feather's first top-k
    assert follow["feather+reselect"]["reused"] == follow["feather+reselect"]["united"] == 0
    assert follow["feather+keep_both"]["united"] == follow["feather+keep_both"]["kept_from_turn1"] == 4
    t2 = {n: e["accuracy"] for n, e in follow.items()}
    for name in ("feather+reuse", "feather+add_back", "feather+keep_both"):
        assert report[name]["vs_reselect"]["difference"] == pytest.approx(t2[name] - t2["feather+reselect"])
    assert isinstance(data["unpruned"]["weak"], bool)
    printed = capsys.readouterr().out
    assert "unpruned on two-object scenes: turn 1" in printed and data["unpruned"]["text"] in printed


@pytest.mark.parametrize("name, feather", [
    ("fastv", {"preset": "fastv"}),
    ("fastv+reuse", {"preset": "fastv", "follow_up": "reuse"}),
    ("fastv+add_back@0.05", {"preset": "fastv", "follow_up": "add_back", "add_back": 0.05}),
], ids=["preset", "policy", "add-back-share"])
def test_multi_turn_setting_names(name, feather):
    from loadtest.multi_turn import feather_setting

    assert feather_setting(name) == feather


def test_multi_turn_benchmark_against_running_gateway(server, tmp_path, capsys):
    """`python -m loadtest.multi_turn --url` (one round): 3 turns per
    preset, each turn's prompt the whole history, TTFT and KV held per turn
    from the stream, the report and the engine's gauge; the unpruned
    follow-ups find the first turn's prompt in the prefix cache."""
    from loadtest.multi_turn import main

    follow_ups = {"feather_pruned_kv_reuses_total": "reused", "feather_pruned_kept_both_total": "united",
                  "feather_pruned_added_back_total": "added_back"}
    presets = ("fastv", "feather", "pyramiddrop")
    before = {(m, p): _metric_total(server.url, m, preset=p) for m in follow_ups for p in presets}
    main(["--url", server.url, "--served-model-name", "tiny", "--rounds", "1", "--max-tokens", "32",
          "--out", str(tmp_path), "--seed", "100000"])  # images no other test sends
    data = json.loads((tmp_path / "multi_turn.json").read_text())
    conversations = data["conversations"]
    assert [c["preset"] for c in conversations] == ["none", "fastv", "feather", "pyramiddrop"]
    assert data["settings"]["prefix_caching"] is True and len({c["image_seed"] for c in conversations}) == 4
    for c in conversations:
        turns = c["turns"]
        assert len(turns) == 3 and turns[0]["prompt_tokens"] == 591
        assert turns[0]["prompt_tokens"] < turns[1]["prompt_tokens"] < turns[2]["prompt_tokens"]
        for t in turns:
            # The gauge is read while the turn decodes, never after (None where it ended first).
            assert t["ttft_s"] > 0 and t["fallback"] is None
            assert t["kv_usage_perc"] is None or 0 < t["kv_usage_perc"] < 1
            assert 0 < t["kv_blocks"]["used"] <= t["kv_blocks"]["unpruned"]
            if c["preset"] == "none":
                assert t["kv_blocks"]["used"] == t["kv_blocks"]["unpruned"]
            else:
                assert t["kv_blocks"]["used"] < t["kv_blocks"]["unpruned"]
        assert turns[0]["prefix_cache_hit_tokens"] == 0 and turns[0]["reused"] is None  # a fresh image
        # Their presets' policies: feather's follow-ups reuse turn 1's pruned
        # image and kept set; fastv's reuse them and add back 144 tokens each
        # (turn 3 to turn 1's, an added turn is no cut); pyramiddrop's cut
        # again, each keeping the turn before's kept set too.
        reused = [bool(t["reused"]) and t["reused"]["kept_from"] == turns[0]["id"] for t in turns[1:]]
        assert reused == [c["preset"] in ("feather", "fastv")] * 2
        assert [t["reused"]["added"] for t in turns[1:] if t["reused"]] == ([144] * 2 if c["preset"] == "fastv"
                                                                             else [0] * sum(reused))
        united = [t["united"]["kept_from"] if t["united"] else None for t in turns]
        assert united == ([None, turns[0]["id"], turns[1]["id"]] if c["preset"] == "pyramiddrop" else [None] * 3)
    assert any(t["kv_usage_perc"] for c in conversations for t in c["turns"])
    none = conversations[0]["turns"]
    assert none[1]["prefix_cache_hit_tokens"] >= 576 and none[2]["prefix_cache_hit_tokens"] >= 576
    summary = data["summary"]
    assert list(summary) == ["none", "fastv", "feather", "pyramiddrop"]
    for preset, turns in summary.items():
        assert len(turns) == 3 and all(t["n"] == 1 for t in turns)
        (measured,) = [c["turns"] for c in conversations if c["preset"] == preset]
        for k, (t, m) in enumerate(zip(turns, measured)):
            assert t["ttft_s"] == m["ttft_s"] and t["kv_blocks_used"] == m["kv_blocks"]["used"]
            assert t["reused"] == t["kept_from_turn1"] == bool(m["reused"])
            assert t["added_back"] == bool(m["reused"] and m["reused"]["added"])
            assert t["united"] == bool(m["united"])
            assert t["ttft_s_x_none"] == pytest.approx(m["ttft_s"] / summary["none"][k]["ttft_s"])
    # The gateway counts each policy's follow-ups: the recorded round's and its warm-up's.
    for (name, preset), value in before.items():
        key = follow_ups[name]
        assert _metric_total(server.url, name, preset=preset) - value == 2 * sum(t[key] for t in summary[preset])
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 13 and "pyramiddrop" in printed and "TTFT ms" in printed


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
    (one block per 32 tokens of prompt and answer in each of the 8 groups;
    vLLM's own class holds as many blocks of all 32 layers)."""
    import math

    from loadtest.kv_capacity import measure, report

    results = measure(str(tiny_checkpoint), kv_cache_mib=64, block_size=32, requests=3, max_tokens=2)
    presets = results["presets"]
    assert list(presets) == ["none", "fastv", "feather", "pyramiddrop"]
    assert presets["none"]["blocks_per_group"] == [math.ceil((591 + 1) / 32)] * 8
    assert results["vllm_layer_blocks"] == math.ceil((591 + 1) / 32) * 32 and presets["none"]["x_vllm"] == 1.0
    assert all(presets[p]["blocks"] < presets["none"]["blocks"] for p in ("fastv", "feather", "pyramiddrop"))
    assert all(r["max_concurrent"] >= 1 and r["fallback"] is None for r in presets.values())
    assert "feather" in report(results)


# -- autoscaling: the KV demand model against the engine, the queue model ------------------------

@pytest.mark.parametrize("preset", ["none", "fastv", "feather", "pyramiddrop"])
def test_kv_demand_block_model_matches_the_engine(server, preset):
    """server.kv_demand's block count of a request (what the autoscaling
    gauge adds up) equals the blocks the engine reports it held: at the
    cuts' real kept counts exactly, at the stages' upper bounds (the
    scheduler's reservation) no fewer."""
    from feather_vllm.pruning import config as pcfg
    from loadtest.generator import chat_body, synthetic_image_url
    from feather_vllm.pruning.layout import LayoutRule
    from server.kv_demand import KVPool, request_blocks

    body = {**chat_body(LoadConfig(url=server.url, model="tiny", max_tokens=4), synthetic_image_url(336, 3), preset),
            "stream": False, "stream_options": None}
    answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    report, usage = answer["feather"], answer["usage"]
    total = float(httpx.get(server.url + "/metrics").text.split("\nfeather_kv_total_blocks ")[1].split()[0])
    # The gateway's CPU block size (32); the tiny checkpoint's 336-pixel, 14-pixel-patch tower.
    pool = KVPool.build(32, pcfg.kv_boundaries(None, 32), 32, int(total) + 1, LayoutRule("llava", 336, 14))
    config = pcfg.PRESETS[preset]
    held = usage["prompt_tokens"] + usage["completion_tokens"] - 1  # the last token's KV is never written
    kept = [stage["kept"] for stage in report["stages"]]
    assert usage["prompt_tokens"] == 591 and report["image_tokens"] == 576
    assert request_blocks(pool, config, [576], held, kept=kept) == report["kv_blocks"]["used"]
    assert request_blocks(pool, config, [576], held) >= report["kv_blocks"]["used"]
    assert request_blocks(pool, pcfg.PRESETS["none"], [576], held) == report["kv_blocks"]["unpruned"] == 8 * 19


def test_autoscalers_name_metrics_the_gateway_exports(server):
    """Every metric the HPAs (through prometheus-adapter) and KEDA scale on
    is on a live gateway's /metrics, unlabelled where the gateway owns it."""
    import re
    from pathlib import Path

    import yaml
    from prometheus_client.parser import text_string_to_metric_families

    k8s = Path(__file__).resolve().parents[1] / "deploy/k8s"
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    adapter = yaml.safe_load((k8s / "prometheus-adapter/values.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: re.match(r"[\w:]+", rule["seriesQuery"]).group() for rule in adapter}
    assert served == {"vllm_num_requests_waiting": "vllm:num_requests_waiting",
                      "feather_kv_demand_ratio": "feather_kv_demand_ratio"}
    for path in sorted(k8s.glob("components/hpa-*/hpa.yaml")):
        (metric,) = [m["pods"]["metric"]["name"] for m in yaml.safe_load(path.read_text())["spec"]["metrics"]]
        assert served[metric] in families, path
    for path in sorted(k8s.glob("components/keda-*/scaledobject.yaml")):
        (trigger,) = yaml.safe_load(path.read_text())["spec"]["triggers"]
        (name,) = re.findall(r"sum\(([\w:]+)\{", trigger["metadata"]["query"])
        assert name in families, path
    for name in ("feather_kv_demand_blocks", "feather_kv_free_blocks", "feather_kv_total_blocks",
                 "feather_kv_demand_ratio"):
        assert families[name].type == "gauge" and [s.labels for s in families[name].samples] == [{}]


def _sim_costs(pool_blocks: int):
    import dataclasses

    from loadtest.autoscale_sim import MEASURED

    return dataclasses.replace(MEASURED, pool_blocks=pool_blocks)


@pytest.mark.parametrize("pool", [852, 200], ids=["both-fit", "one-fits"])
def test_autoscale_sim_step_model_is_exact(pool):
    """Two unpruned chats at t=0 on one idle replica: the first's prefill
    step starts at once (its measured TTFT), the second waits for the next
    step; with room for both it prefills there beside the first's first
    decode step, with room for one it waits for the first's blocks (its
    prefill and 47 decode steps alone)."""
    from loadtest.autoscale_sim import Request, simulate

    costs = _sim_costs(pool)
    none = costs.presets["none"]
    decode_alone = costs.step_base_s + none.step_marginal_s
    result = simulate([Request(0.0, "none"), Request(0.0, "none")], costs, None, replicas=1)
    assert result["finished"] == 2 and result["peak_blocks_used"] == min(2, pool // 160) * 160
    wait = none.prefill_s if pool >= 320 else none.prefill_s + 47 * decode_alone
    second_ttft = wait + none.prefill_s + (decode_alone if pool >= 320 else 0.0)
    assert result["queue_delay_s"]["p50"] == 0.0 and result["queue_delay_s"]["max"] == pytest.approx(wait)
    assert result["ttft_s"]["p50"] == pytest.approx(none.prefill_s)
    assert result["ttft_s"]["max"] == pytest.approx(second_ttft)


def test_autoscale_sim_compares_signals_on_a_tiny_trace(tmp_path):
    """`python -m loadtest.autoscale_sim` on a 4-minute trace: every run
    serves every request without overfilling a pool; each signal's sweep,
    the manifests' targets and the fixed reference are reported; the
    manifests' HPAs are the model's (targets and behaviour)."""
    from pathlib import Path

    import yaml

    from loadtest import autoscale_sim as sim

    out = tmp_path / "sim.json"
    sim.main(["--duration", "240", "--traces", "2", "--startup-s", "30", "--json", str(out),
              "--plot", str(tmp_path / "sim.png")])
    result = json.loads(out.read_text())
    assert set(result) == {"traces", "requests", "slo_p95_queue_delay_s", "pruned_share", "signals",
                           "fixed_within_slo"}
    assert result["traces"] == 2 and result["requests"] > 50 and 0 < result["pruned_share"] < 1
    assert list(result["signals"]) == ["waiting", "kv_demand"]
    for signal, data in result["signals"].items():
        targets = [run["target"] for run in data["runs"]]
        assert targets == sorted({*sim.SWEEP[signal], sim.MANIFEST_TARGETS[signal]})
        assert data["manifest_target"] == sim.MANIFEST_TARGETS[signal]
        for run in data["runs"]:
            assert run["finished"] == result["requests"]
            assert 1 <= run["mean_replicas"] <= run["peak_replicas"] <= sim.Scaler.max_replicas
            assert 0 <= run["queue_delay_p50_s"] <= run["queue_delay_p95_s"] <= run["ttft_p95_s"]
            assert bool(run["timeline"]) == (run["target"] == sim.MANIFEST_TARGETS[signal])
    assert (tmp_path / "sim.png").stat().st_size > 10_000
    k8s = Path(__file__).resolve().parents[1] / "deploy/k8s/components"
    scaler = sim.Scaler("kv_demand", 0)
    for signal, name in (("waiting", "waiting"), ("kv_demand", "kv-demand")):
        hpa = yaml.safe_load((k8s / f"hpa-{name}/hpa.yaml").read_text())["spec"]
        keda = yaml.safe_load((k8s / f"keda-{name}/scaledobject.yaml").read_text())["spec"]
        (metric,) = hpa["metrics"]
        assert float(metric["pods"]["target"]["averageValue"].removesuffix("m")) / 1000 == sim.MANIFEST_TARGETS[signal]
        assert float(keda["triggers"][0]["metadata"]["threshold"]) == sim.MANIFEST_TARGETS[signal]
        behavior = keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior == hpa["behavior"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (keda["minReplicaCount"], keda["maxReplicaCount"]) \
            == (scaler.min_replicas, scaler.max_replicas)
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == scaler.scale_down_window_s
        assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1,
                                                      "periodSeconds": scaler.scale_down_period_s}]
        assert keda["pollingInterval"] == scaler.interval_s


@pytest.mark.parametrize("signal", ["waiting", "kv_demand"])
def test_autoscale_sim_pruned_traffic_costs_no_more(signal):
    """The same arrivals, all `feather` vs all unpruned: pruned requests
    cost less everywhere (blocks, prefill, decode), so they never need more
    replicas or wait longer at p95, under either signal or fixed replicas."""
    import dataclasses

    from loadtest.autoscale_sim import MEASURED, Phase, Scaler, make_trace, simulate

    arrivals = make_trace([Phase(300, 0.3, 0.0, rate_end=2.0)], seed=1)
    runs = {}
    for preset in ("feather", "none"):
        trace = [dataclasses.replace(r, preset=preset) for r in arrivals]
        runs[preset] = (simulate(trace, MEASURED, Scaler(signal, 1.0, startup_s=30)),
                        simulate(trace, MEASURED, None, replicas=2))
    for pruned, unpruned in zip(runs["feather"], runs["none"]):
        assert pruned["finished"] == unpruned["finished"] == len(arrivals)
        assert pruned["mean_replicas"] <= unpruned["mean_replicas"]
        assert pruned["queue_delay_s"]["p95"] <= unpruned["queue_delay_s"]["p95"]
    assert runs["none"][1]["queue_delay_s"]["p95"] > 10 * runs["feather"][1]["queue_delay_s"]["p95"] + 1


@pytest.mark.parametrize(("got", "want", "top", "expected"), [
    (["a", "b", "c"], ["a", "b", "c"], [{"a": -0.1}, {"b": -0.1}, {"c": -0.1}], None),
    (["a", "x", "y"], ["a", "b", "c"], [{"a": -0.1}, {"b": -0.6930, "x": -0.6935}, {"c": -0.1}], (1, 5e-4, True)),
    (["a", "x", "y"], ["a", "b", "c"], [{"a": -0.1}, {"b": -0.5, "x": -0.9}, {"c": -0.1}], (1, 0.4, False)),
    (["x", "b", "c"], ["a", "b", "c"], [{"a": -0.1, "z": -0.1002}, {"b": -0.1}, {"c": -0.1}], (0, None, False)),
    (["a", "b"], ["a", "b", "c"], [{"a": -0.1}, {"b": -0.1}, {"c": -0.1}], (2, None, False)),
], ids=["equal", "near-tie", "beyond-tie", "not-a-candidate", "shorter"])
def test_preemption_first_divergence(got, want, top, expected):
    """loadtest.preemption counts an answer as differing unless, where it
    first leaves the reference, the reference's logprobs of the two tokens
    are within 1e-3."""
    from loadtest.preemption import first_divergence

    found = first_divergence(got, want, top)
    if expected is None:
        assert found is None
    else:
        index, gap, near_tie = expected
        assert found.index == index and found.near_tie is near_tie
        assert found.gap == (None if gap is None else pytest.approx(gap, abs=1e-9))


def test_benchmark_report_says_na_where_no_text_streamed():
    """A TTFT is None when a request streamed no text (a random checkpoint's
    first tokens can all be special tokens); the report says n/a there and
    still gives the engine's prefill against the cost model."""
    from loadtest.benchmark import PRESETS, TTFT_CASES, report

    def per_case(values):
        return {case: {p: list(values[p]) for p in PRESETS} for case in TTFT_CASES}

    ttft = {"none": [2.0, 2.0], "fastv": [None, None], "feather": [0.8, 0.8], "pyramiddrop": [1.0, 1.0]}
    prefill = {"none": [1.9, 1.9], "fastv": [0.5, 0.5], "feather": [0.7, 0.7], "pyramiddrop": [0.9, 0.9]}
    pred = {p: {f"prefill_{case}": 0.5 for case in TTFT_CASES} for p in PRESETS}
    text = report({"ttft_c1": per_case(ttft), "prefill_c1": per_case(prefill),
                   "overhead_ttft_c1": {"gateway": [2.0], "vllm": [2.0]}}, pred)
    assert "fastv n/a (no text streamed)" in text
    assert "feather 800 ms (0.40x none, model 0.50x: 0.80x the model)" in text
    assert "fastv 500 ms (0.26x none, model 0.50x: 0.53x the model)" in text
