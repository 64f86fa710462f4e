"""Tensor parallelism through the gateway: `--tensor-parallel-size 2` (two
worker processes, one core each) keeps exactly the image tokens, and gives
exactly the answers, of a single-rank engine; so do follow-up turns under
each preset's default policy."""

from __future__ import annotations

import httpx
import pytest

from feather_vllm.kv.plan import report_of
from tests.helpers import ServerProcess, chat, make_llm, png_data_url, sample_images, shutdown

QUESTION = "Where is the red square?"
PRESETS = ["none", "fastv", "feather", "pyramiddrop"]
IMAGES = [0, 1, 2]


@pytest.fixture(scope="module")
def single_rank(tiny_checkpoint):
    """(text, kept indices per stage) per (image, preset) from a TP=1 engine."""
    from vllm import SamplingParams

    llm = make_llm(tiny_checkpoint)
    try:
        out = {}
        for i in IMAGES:
            for preset in PRESETS:
                params = SamplingParams(max_tokens=8, temperature=0.0, extra_args={"feather": preset})
                result = llm.chat(chat(sample_images()[i], QUESTION), params, use_tqdm=False)[0]
                out[i, preset] = (result.outputs[0].text, [list(stage.per_image[0]) for stage in report_of(result).stages])
        return out
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def tp2_server(tiny_checkpoint):
    # One core per rank; the KV budget is vLLM's --kv-cache-memory-bytes
    # (VLLM_CPU_KVCACHE_SPACE, unset by conftest.py, would override it).
    proc = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--tensor-parallel-size", "2",
                         "--kv-cache-memory-bytes", "256M", startup_timeout=300,
                         env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    # Two worker processes really serve it (vLLM names them by rank in its logs).
    assert "Worker_TP0" in proc.logs() and "Worker_TP1" in proc.logs()
    yield proc
    proc.stop()


@pytest.mark.parametrize("image", IMAGES, ids=[f"image-{i}" for i in IMAGES])
@pytest.mark.parametrize("preset", PRESETS)
def test_tp2_keeps_the_single_rank_tokens(tp2_server, single_rank, preset, image):
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0,
            "feather": {"preset": preset, "return_kept": True},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(sample_images()[image])}},
                {"type": "text", "text": QUESTION}]}]}
    r = httpx.post(tp2_server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text, kept = single_rank[image, preset]
    report = r.json()["feather"]
    assert [s["kept_indices"] for s in report["images"][0]["stages"]] == kept
    assert r.json()["choices"][0]["message"]["content"] == text
    # Each rank holds half the heads, but the block count per group is the same.
    assert report["kv_blocks"]["used"] < report["kv_blocks"]["unpruned"] or preset == "none"


FOLLOW_UP = "And the blue circle?"
# Each preset's default policy for a follow-up (feather reuses, fastv adds
# back, pyramiddrop keeps both), and the report field that says it ran.
POLICIES = {"feather": "reused", "fastv": "reused", "pyramiddrop": "united"}


def _follow_up_image():
    from PIL import ImageOps

    return ImageOps.flip(sample_images()[1])  # no other test here sends it


@pytest.fixture(scope="module")
def single_rank_follow_ups(tiny_checkpoint):
    """(turn 1 text, turn 2 text, turn 2 kept indices per stage, turn 2
    report) per preset, from a TP=1 engine with prefix caching (the
    gateway's default), each turn 2 after its own turn 1."""
    from vllm import SamplingParams

    llm = make_llm(tiny_checkpoint, enable_prefix_caching=True)
    try:
        out = {}
        for preset in POLICIES:
            params = SamplingParams(max_tokens=8, temperature=0.0, extra_args={"feather": preset})
            first = chat(_follow_up_image(), QUESTION)
            one = llm.chat(first, params, use_tqdm=False)[0].outputs[0].text
            history = [*first, {"role": "assistant", "content": one}, {"role": "user", "content": FOLLOW_UP}]
            two = llm.chat(history, params, use_tqdm=False)[0]
            report = report_of(two)
            out[preset] = (one, two.outputs[0].text, [list(s.per_image[0]) for s in report.stages], report)
        return out
    finally:
        shutdown(llm)


@pytest.mark.parametrize("preset", POLICIES)
def test_tp2_follow_up_turns_equal_the_single_rank(tp2_server, single_rank_follow_ups, preset):
    """A follow-up turn under each preset's default policy (feather: reuse
    the pruned KV from the cache; fastv: reuse it and add back what the new
    question ranks highest, rank 0's choice on both ranks; pyramiddrop: cut
    again, keeping turn 1's kept set too) keeps, answers and reports on two
    ranks what it does on one."""
    one, two, kept, single = single_rank_follow_ups[preset]
    assert getattr(single, POLICIES[preset]) is not None  # the policy ran on one rank
    assert (single.reused is not None and single.reused.added > 0) == (preset == "fastv")
    image = {"type": "image_url", "image_url": {"url": png_data_url(_follow_up_image())}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}]
    replies = []
    for turn in range(2):
        body = {"model": "tiny", "max_tokens": 8, "temperature": 0, "messages": messages,
                "feather": {"preset": preset, "return_kept": True}}
        r = httpx.post(tp2_server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        replies.append(r.json())
        messages = [*messages, {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                    {"role": "user", "content": FOLLOW_UP}]
    assert [r["choices"][0]["message"]["content"] for r in replies] == [one, two]
    report = replies[1]["feather"]
    assert [s["kept_indices"] for s in report["images"][0]["stages"]] == kept
    assert report[POLICIES[preset]]["kept_from"] == replies[0]["id"]  # what turn 1 kept, by its response id
    if preset == "fastv":
        assert report["reused"]["added"] == single.reused.added
