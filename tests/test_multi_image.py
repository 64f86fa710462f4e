"""Several images in one prompt: each image keeps its own top fraction and
grid, scored by the last prompt token against that image's keys alone.
Kept sets, tokens and logprobs equal the transformers reference; the KV
reservation is the sum of each image's upper bound per stage, and the
report gives kept tokens per image and stage. A follow-up turn that adds
back adds each image's own top tokens and equals its reference."""

from __future__ import annotations

import math

import pytest
import torch

from feather_vllm.kv.plan import report_of
from feather_vllm.pruning.config import resolve
from feather_vllm.pruning.cost import kept_per_stage_max
from tests.helpers import engine_parts, make_llm, sample_images, shutdown
from tests.reference_hf import kept_lists, reference_add_back, reference_generate

MAX_TOKENS = 12
BLOCK = 32
NUM_IMAGE = 576
PRUNED = ["fastv", "feather", "pyramiddrop"]
# (images, text before the second image, question): two layouts of two images.
CASES = [((1, 2), "Left picture.", "Where is the red square?"),
         ((0, 1), "", "Describe the second picture in one word.")]


def _content(images, between, question):
    pictures = sample_images()
    parts = [{"type": "image"}]
    if between:
        parts.append({"type": "text", "text": between})
    parts += [{"type": "image"}, {"type": "text", "text": question}]
    return parts, [pictures[i] for i in images]


def _conversation(images, between, question):
    parts, pictures = _content(images, between, question)
    it = iter(pictures)
    return [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": next(it)} if p["type"] == "image" else p for p in parts]}]


def _params(preset):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True,
                          extra_args={"feather": preset})


ADD_BACK = {"preset": "fastv", "follow_up": "add_back"}
FOLLOW_UP = "And the blue circle?"


@pytest.fixture(scope="module")
def results(tiny_checkpoint):
    """Every case under every preset in one batch (block size 32, prefix
    caching on); then a fastv conversation about the first case whose
    turn 2 adds back."""
    llm = make_llm(tiny_checkpoint, block_size=BLOCK, max_model_len=2048, enable_prefix_caching=True)
    try:
        presets = ["none", *PRUNED]
        convs = [_conversation(*case) for _ in presets for case in CASES]
        params = [_params(preset) for preset in presets for _ in CASES]
        outs = llm.chat(convs, params, use_tqdm=False)
        _, kv, _ = engine_parts(llm)
        first_layers = [g.kv_cache_spec.feather_first_layer for g in kv.kv_cache_config.kv_cache_groups]
        first = _conversation(*CASES[0][:2], "Where is the green circle?")
        one = llm.chat(first, _params(ADD_BACK), use_tqdm=False)[0]
        follow_up = [*first, {"role": "assistant", "content": one.outputs[0].text},
                     {"role": "user", "content": FOLLOW_UP}]
        add_back = (one, llm.chat(follow_up, _params(ADD_BACK), use_tqdm=False)[0])
    finally:
        shutdown(llm)
    results = {}
    for i, out in enumerate(outs):
        tokens = list(out.outputs[0].token_ids)
        results[presets[i // len(CASES)], i % len(CASES)] = {
            "token_ids": tokens, "report": report_of(out), "prompt_len": len(out.prompt_token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]}
    results["add_back"] = add_back
    return results, first_layers


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    out = {}
    for c, case in enumerate(CASES):
        parts, pictures = _content(*case)
        text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        inputs = processor(images=pictures, text=text, return_tensors="pt")
        for preset in PRUNED:
            out[preset, c] = reference_generate(model, inputs["input_ids"], inputs["pixel_values"],
                                                resolve(preset), MAX_TOKENS)
    return out


CASE_IDS = ["text-between", "adjacent"]


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
@pytest.mark.parametrize("preset", PRUNED)
def test_each_image_keeps_what_the_reference_keeps(results, reference, preset, case):
    got, ref = results[0][preset, case], reference[preset, case]
    report = got["report"]
    assert report.fallback is None and report.image_tokens == (NUM_IMAGE, NUM_IMAGE)
    assert [stage.layer for stage in report.stages] == list(resolve(preset).cut_layers)
    assert kept_lists(report.stages) == ref["kept"]
    assert got["token_ids"] == ref["token_ids"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"])) < 1e-3


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
@pytest.mark.parametrize("preset", PRUNED)
def test_kv_held_is_what_the_images_kept(results, preset, case):
    """Each image keeps at most its own bound (the reservation is the sum
    of the bounds); once the cut is known, each KV group holds the prompt
    and generated tokens minus the image tokens absent from the stage's
    first layer, as really kept (the surplus of the reservation is freed)."""
    (got, first_layers) = results[0][preset, case], results[1]
    report, config = got["report"], resolve(preset)
    bounds = [2 * k for k in kept_per_stage_max(config, NUM_IMAGE)]
    for stage, bound in zip(report.stages, bounds):
        assert stage.total <= bound
        assert all(len(k) <= bound // 2 for k in stage.per_image)
    tokens = got["prompt_len"] + MAX_TOKENS - 1  # the last token is sampled, never cached
    expected = []
    for first in first_layers:
        kept = [s.total for s in report.stages if s.layer <= first]
        expected.append(math.ceil((tokens - (2 * NUM_IMAGE - kept[-1] if kept else 0)) / BLOCK))
    assert list(report.kv_blocks_held) == expected
    assert list(report.kv_blocks_unpruned) == [math.ceil(tokens / BLOCK)] * len(first_layers)


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_feather_holds_at_most_half_the_kv_of_unpruned(results, case):
    pruned, unpruned = results[0]["feather", case]["report"], results[0]["none", case]["report"]
    assert unpruned.kv_blocks_used == unpruned.kv_blocks_unpruned_total == pruned.kv_blocks_unpruned_total
    assert pruned.kv_blocks_used <= 0.5 * unpruned.kv_blocks_used


def test_add_back_adds_each_images_own_top_tokens(tiny_checkpoint, results):
    """Turn 2 of a two-image fastv conversation reuses turn 1's pruned KV
    and adds back, per image, fastv's keep count of what that image lost,
    ranked by the follow-up's criterion over that image's dropped tokens;
    tokens and kept sets equal the reference."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    one, two = results[0]["add_back"]
    first, report = report_of(one), report_of(two)
    assert report.reused is not None and report.reused.added == 2 * 144
    assert [len(k) for k in report.stages[0].per_image] == [288, 288]
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    pixels = processor.image_processor(images=[sample_images()[i] for i in CASES[0][0]],
                                       return_tensors="pt")["pixel_values"]
    want = reference_add_back(model, torch.tensor([two.prompt_token_ids]), pixels, resolve(ADD_BACK), MAX_TOKENS,
                              kept_lists(first.stages), report.reused.tokens, 144)
    assert kept_lists(report.stages) == want["kept"]
    assert list(two.outputs[0].token_ids) == want["token_ids"]


def test_pruning_changes_the_answer(results):
    """Not a no-op on this checkpoint (else the equalities prove little)."""
    for preset in PRUNED:
        assert [results[0][preset, c]["token_ids"] for c in range(len(CASES))] != \
            [results[0]["none", c]["token_ids"] for c in range(len(CASES))]
