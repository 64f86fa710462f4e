"""Pruned KV under other engine settings: one KV group, a small KV budget
(capacity, preemption), a step budget too small for an image (fallback) and
prefix caching.
Each test starts its own engine (one engine at a time per process)."""

from __future__ import annotations

import pytest

from tests.helpers import chat, engine_parts, image_prompt, make_llm, sample_images, shutdown
from tests.test_kv_cache import BLOCK, PRESETS, QUESTION, _params

CONVS_PER_IMAGE = (QUESTION, "Describe the picture.")


def _convs():
    return [chat(img, q) for img in sample_images() for q in CONVS_PER_IMAGE]


def _tokens(llm, preset, max_tokens=160, convs=None):
    outs = llm.chat(convs or _convs(), _params(preset, max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def reference_tokens(tiny_checkpoint):
    """Greedy tokens on the default engine (staged KV, roomy budget)."""
    llm = make_llm(tiny_checkpoint, block_size=BLOCK)
    try:
        return {p: _tokens(llm, p) for p in PRESETS}
    finally:
        shutdown(llm)


def test_outputs_match_single_kv_group(tiny_checkpoint, reference_tokens):
    """Staged KV groups change where KV lives, not what the model computes."""
    llm = make_llm(tiny_checkpoint, block_size=BLOCK,
                   hf_overrides={"architectures": ["FeatherLlavaForConditionalGeneration"],
                                 "feather_kv_boundaries": []})
    try:
        _, kv, _ = engine_parts(llm)
        assert len(kv.kv_cache_config.kv_cache_groups) == 1
        single = {p: _tokens(llm, p) for p in PRESETS}
    finally:
        shutdown(llm)
    assert single == reference_tokens
    assert reference_tokens["feather"] != reference_tokens["none"]


def test_capacity_at_fixed_budget(tiny_checkpoint):
    """At one small KV budget, feather runs >= 2x as many image requests at
    once as none (seen in the scheduler). (Requests preempted for lack of KV
    recompute to the same tokens: tests/test_preemption.py.)"""
    small = make_llm(tiny_checkpoint, block_size=BLOCK, kv_cache_bytes=24 * 2**20)
    try:
        scheduler, kv, _ = engine_parts(small)
        engine = small.llm_engine
        peak = {}
        for preset in ("none", "feather"):
            for i in range(24):
                engine.add_request(f"cap-{preset}-{i}", image_prompt(sample_images()[i % 3], QUESTION),
                                   _params(preset, 48))
            running = 0
            while engine.has_unfinished_requests():
                engine.step()
                running = max(running, len(scheduler.running))
            peak[preset] = running
        assert peak["feather"] >= 2 * peak["none"], peak
    finally:
        shutdown(small)


def test_image_and_tail_beyond_a_step_fall_back_unpruned(tiny_checkpoint, reference_tokens):
    """A 256-token step can never hold an image (576 tokens) and the prompt
    after it: the chunk stands, the request runs unpruned and says why."""
    from feather_vllm.kv.plan import report_of
    from feather_vllm.pruning.schedule import FallbackReason

    chunked = make_llm(tiny_checkpoint, block_size=BLOCK, enable_chunked_prefill=True, max_num_batched_tokens=256)
    try:
        outs = chunked.chat(_convs(), _params("feather", 160), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == reference_tokens["none"]
        reports = [report_of(o) for o in outs]
        assert [r.fallback for r in reports] == [FallbackReason.PROMPT_SPLIT] * 6
        assert all(r.stages == () and r.kv_blocks_held == r.kv_blocks_unpruned for r in reports)
    finally:
        shutdown(chunked)


def test_prefix_caching_keeps_pruned_outputs(tiny_checkpoint, reference_tokens):
    cached = make_llm(tiny_checkpoint, block_size=BLOCK, enable_prefix_caching=True)
    try:
        for _ in range(2):  # the second round hits the cache
            for preset in PRESETS:
                assert _tokens(cached, preset) == reference_tokens[preset], preset
    finally:
        shutdown(cached)


SYSTEM = "You answer questions about one picture. Name the place of the object in it. " * 6


def _system_chat(image, question):
    return [{"role": "system", "content": SYSTEM}, *chat(image, question)]


# Served one at a time, each conversation after the one before it:
# 1. feather on one system prompt with three images/questions;
# 2. per pruned preset, on an image of its own (one no earlier request
#    sent: a cached block of it would be found first): the pruned request,
#    then the same conversation unpruned twice (the second hits the first's blocks).
REUSE = [("feather", 0, QUESTION), ("feather", 1, QUESTION), ("feather", 1, "Describe the picture.")]
AFTER_PRUNED = [(preset, -1 - image, "Which corner is it in?") for image, preset in enumerate(PRESETS[1:])
                for preset in (preset, "none", "none")]


def _image(index: int):
    """sample_images()[index]; a negative index: sample image -1 - index, mirrored."""
    from PIL import ImageOps

    return sample_images()[index] if index >= 0 else ImageOps.mirror(sample_images()[-1 - index])


@pytest.fixture(scope="module")
def prefix_cache_runs(tiny_checkpoint):
    """(outputs with prefix caching, (tokens, kept stages) with it, the same without it),
    for REUSE + AFTER_PRUNED; and the image token id."""
    from feather_vllm.kv.plan import report_of

    def run(llm):
        outs = [llm.chat(_system_chat(_image(image), question), _params(preset, 8, logprobs=0),
                         use_tqdm=False)[0]
                for preset, image, question in REUSE + AFTER_PRUNED]
        return outs, [(list(o.outputs[0].token_ids), report_of(o).stages) for o in outs]

    plain = make_llm(tiny_checkpoint, block_size=BLOCK)
    try:
        _, expected = run(plain)
    finally:
        shutdown(plain)
    cached = make_llm(tiny_checkpoint, block_size=BLOCK, enable_prefix_caching=True)
    try:
        outs, got = run(cached)
        image_token = cached.llm_engine.model_config.hf_config.image_token_index
    finally:
        shutdown(cached)
    return outs, got, expected, image_token


def test_prefix_cache_reuses_the_text_before_the_image(prefix_cache_runs):
    """A repeated system prompt before the image is reused from the cache by
    pruned requests (the full blocks before the image: compaction moves
    nothing there); the image is recomputed and pruned, also for the same
    image with another question. Tokens and kept sets equal an engine
    without prefix caching."""
    outs, got, expected, image_token = prefix_cache_runs
    n = len(REUSE)
    assert got[:n] == expected[:n]
    image_offset = outs[0].prompt_token_ids.index(image_token)
    assert image_offset > 2 * BLOCK  # the system prompt spans full blocks
    assert [o.num_cached_tokens for o in outs[:n]] == [0] + [image_offset // BLOCK * BLOCK] * 2


@pytest.mark.parametrize("preset", PRESETS[1:])
def test_unpruned_requests_never_read_pruned_blocks(prefix_cache_runs, preset):
    """After a pruned request, the same conversation unpruned computes its
    image (no block a cut compacted in any layer is offered, FastV's cut
    inside the first KV stage included), caches it, and a repeat reads it:
    all with the tokens of an engine without prefix caching."""
    outs, got, expected, image_token = prefix_cache_runs
    i = len(REUSE) + 3 * PRESETS[1:].index(preset)
    assert got[i:i + 3] == expected[i:i + 3]
    # Even where a wrong block leaves the greedy tokens alone, it shows in their logprobs.
    first = [lp[t].logprob for lp, t in zip(outs[i + 1].outputs[0].logprobs, got[i + 1][0])]
    repeat = [lp[t].logprob for lp, t in zip(outs[i + 2].outputs[0].logprobs, got[i + 2][0])]
    assert max(abs(a - b) for a, b in zip(first, repeat)) < 1e-5
    image_offset = outs[i].prompt_token_ids.index(image_token)
    prompt = len(outs[i].prompt_token_ids)
    assert [o.num_cached_tokens for o in outs[i:i + 3]] == \
        [image_offset // BLOCK * BLOCK] * 2 + [(prompt - 1) // BLOCK * BLOCK]


def test_image_tokens_of_no_known_layout_run_unpruned_and_say_so(tiny_checkpoint):
    """500 image embeddings are no square patch grid: served unpruned (same
    tokens as `none`), with the reason recorded, never pruned wrongly."""
    import torch
    from vllm import SamplingParams

    from feather_vllm.kv.plan import report_of
    from feather_vllm.pruning.schedule import FallbackReason

    llm = make_llm(tiny_checkpoint, block_size=BLOCK, enable_mm_embeds=True)
    try:
        embeds = torch.randn(1, 500, 64, generator=torch.Generator().manual_seed(0)) * 0.1
        prompt = {"prompt": "<s>USER: <image>\nWhere is it?\nASSISTANT:", "multi_modal_data": {"image": embeds}}
        outs = {p: llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, extra_args={"feather": p}),
                                use_tqdm=False)[0] for p in ("none", "feather", "fastv")}
        assert len(outs["none"].prompt_token_ids) == 514
        for preset in ("feather", "fastv"):
            assert list(outs[preset].outputs[0].token_ids) == list(outs["none"].outputs[0].token_ids)
            report = report_of(outs[preset])
            assert report.stages == () and report.fallback is FallbackReason.UNKNOWN_LAYOUT
            assert report.image_tokens == (500,)
        assert report_of(outs["none"]).fallback is None
    finally:
        shutdown(llm)
