"""Chunked prefill on while pruning: the scheduler never ends a chunk
between a pruned request's image and its last prompt token (it ends the
chunk before the image instead), so long text prompts share steps with
image chats and every image chat is still pruned, exactly as alone."""

from __future__ import annotations

import pytest

from feather_vllm.kv.plan import report_of
from tests.helpers import engine_parts, image_prompt, make_llm, sample_images, shutdown

BUDGET = 700  # one image chat (591 tokens) fits a step; two do not
PRESETS = ["feather", "fastv", "pyramiddrop", "feather", "fastv", "pyramiddrop"]
TEXT_PROMPTS = 4


def _params(preset, max_tokens=6):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args={"feather": preset})


def _requests():
    images = sample_images()
    reqs = {f"img-{i}": (image_prompt(images[i % 3], f"Where is the red square? ({i})"), _params(preset))
            for i, preset in enumerate(PRESETS)}
    for i in range(TEXT_PROMPTS):
        # Longer than a step's budget: chunked even alone.
        reqs[f"text-{i}"] = ({"prompt": "<s>USER: " + f"story {i} " * 150 + "\nASSISTANT:"}, _params("feather"))
    return reqs


def _run(engine, scheduler, reqs) -> tuple[dict, dict]:
    """Finished outputs, and the chunk boundaries each request's prefill had."""
    for req_id, (prompt, params) in reqs.items():
        engine.add_request(req_id, prompt, params)
    outs, boundaries = {}, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
        for request in scheduler.running:
            if 0 < request.num_computed_tokens < request.num_prompt_tokens:
                boundaries.setdefault(_given_id(request.request_id), set()).add(request.num_computed_tokens)
    return outs, boundaries


def _given_id(request_id: str) -> str:
    return request_id.rsplit("-", 1)[0]  # the scheduler's id: the given one and a random suffix


@pytest.fixture(scope="module")
def runs(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, enable_chunked_prefill=True, max_num_batched_tokens=BUDGET)
    try:
        engine = llm.llm_engine
        scheduler, _, _ = engine_parts(llm)
        reqs = _requests()
        alone = {}
        for req_id, req in reqs.items():  # one at a time: an image chat fits one step
            outs, boundaries = _run(engine, scheduler, {req_id: req})
            assert req_id.startswith("text-") or boundaries == {}
            alone.update(outs)
        together, boundaries = _run(engine, scheduler, reqs)
        image_token = engine.model_config.hf_config.image_token_index
    finally:
        shutdown(llm)
    return alone, together, boundaries, image_token


def test_prompts_were_chunked(runs):
    """The load really chunks: text prompts split across steps, and some
    image chat had its chunk ended right before its image."""
    alone, together, boundaries, image_token = runs
    assert any(k.startswith("text-") for k in boundaries)
    held = [k for k, b in boundaries.items() if k.startswith("img-") and
            together[k].prompt_token_ids.index(image_token) in b]
    assert held


def test_no_boundary_between_image_and_last_prompt_token(runs):
    alone, together, boundaries, image_token = runs
    for req_id, bounds in boundaries.items():
        if req_id.startswith("img-"):
            assert max(bounds) <= together[req_id].prompt_token_ids.index(image_token), req_id


@pytest.mark.parametrize("req_id", [f"img-{i}" for i in range(len(PRESETS))])
def test_image_chats_are_pruned_exactly_as_alone(runs, req_id):
    alone, together, _, _ = runs
    got, expected = report_of(together[req_id]), report_of(alone[req_id])
    assert got.fallback is None and got.stages and got.stages == expected.stages
    assert list(together[req_id].outputs[0].token_ids) == list(alone[req_id].outputs[0].token_ids)


@pytest.mark.parametrize("req_id", [f"text-{i}" for i in range(TEXT_PROMPTS)])
def test_text_prompts_answer_as_alone(runs, req_id):
    alone, together, _, _ = runs
    assert list(together[req_id].outputs[0].token_ids) == list(alone[req_id].outputs[0].token_ids)
    assert report_of(together[req_id]).fallback is None
