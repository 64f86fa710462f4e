"""Pruning inside vLLM's prefill equals an independent transformers reference:
kept indices per stage, greedy tokens and logprobs, for every preset, with
mixed batches; the unpruned requests of a mixed batch stay stock."""

from __future__ import annotations

import pytest
import torch

from feather_vllm.pruning.config import resolve
from tests.helpers import PROMPTS, chat, engine_parts, make_llm, sample_images, shutdown
from tests.reference_hf import reference_generate

MAX_TOKENS = 16
PRUNED = ["fastv", "feather", "pyramiddrop"]


def _params(preset):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True,
                          extra_args={"feather": preset})


def _result(output, model=None):
    tokens = list(output.outputs[0].token_ids)
    return {
        "token_ids": tokens,
        "logprobs": [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, tokens)],
        "record": model.pruning_record(output.request_id) if model is not None else None,
    }


@pytest.fixture(scope="module")
def cases():
    return [(i, image, prompt) for i, image in enumerate(sample_images()) for prompt in PROMPTS]


@pytest.fixture(scope="module")
def engine_results(tiny_checkpoint, cases):
    """One mixed batch: every (image, prompt) under every preset together."""
    from vllm import SamplingParams

    stock = make_llm(tiny_checkpoint, stock=True)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
        stock_out = stock.chat([chat(img, p) for _, img, p in cases], params, use_tqdm=False)
        stock_results = [_result(o) for o in stock_out]
    finally:
        shutdown(stock)
    llm = make_llm(tiny_checkpoint)
    try:
        _, _, model = engine_parts(llm)
        convs, params = [], []
        for preset in ["none", *PRUNED]:
            for _, img, p in cases:
                convs.append(chat(img, p))
                params.append(_params(preset))
        outs = llm.chat(convs, params, use_tqdm=False)
        results = [_result(o, model) for o in outs]
    finally:
        shutdown(llm)
    n = len(cases)
    by_preset = {preset: results[i * n:(i + 1) * n] for i, preset in enumerate(["none", *PRUNED])}
    return {"stock": stock_results, **by_preset}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, cases):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    out = {}
    for preset in PRUNED:
        out[preset] = []
        for _, image, prompt in cases:
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True)
            inputs = processor(images=image, text=text, return_tensors="pt")
            out[preset].append(reference_generate(model, inputs["input_ids"], inputs["pixel_values"],
                                                  resolve(preset), MAX_TOKENS))
    return out


@pytest.mark.parametrize("preset", PRUNED)
def test_kept_indices_equal_reference(engine_results, reference, preset):
    for got, ref in zip(engine_results[preset], reference[preset]):
        assert got["record"]["fallback"] is None
        assert [s["layer"] for s in got["record"]["stages"]] == list(resolve(preset).cut_layers)
        assert [s["kept"] for s in got["record"]["stages"]] == ref["kept"]


@pytest.mark.parametrize("preset", PRUNED)
def test_tokens_and_logprobs_equal_reference(engine_results, reference, preset):
    for got, ref in zip(engine_results[preset], reference[preset]):
        assert len(got["token_ids"]) == MAX_TOKENS
        assert got["token_ids"] == ref["token_ids"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"])) < 1e-3


def test_presets_change_outputs(engine_results):
    """Pruning is not a no-op on this checkpoint (else the tests above prove little)."""
    for preset in PRUNED:
        assert [r["token_ids"] for r in engine_results[preset]] != \
            [r["token_ids"] for r in engine_results["none"]]


def test_unpruned_requests_in_mixed_batch_are_stock(engine_results):
    for got, stock in zip(engine_results["none"], engine_results["stock"]):
        assert got["token_ids"] == stock["token_ids"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], stock["logprobs"])) < 1e-4
        assert got["record"] is None


def test_kept_counts_follow_the_schedule(engine_results):
    """FastV keeps int(576 * 0.25); FEATHER's stage 1 is top-int(576 * 0.3)
    union the 64-token grid and stage 2 keeps int(N1 * 0.09) of those."""
    from feather_vllm.pruning.selection import uniform_grid

    grid = set(uniform_grid(576, 3).tolist())
    for got in engine_results["fastv"]:
        assert [len(s["kept"]) for s in got["record"]["stages"]] == [144]
    for got in engine_results["feather"]:
        stage1, stage2 = (s["kept"] for s in got["record"]["stages"])
        assert grid <= set(stage1) and 172 <= len(stage1) <= 172 + 64
        assert set(stage2) <= set(stage1) and len(stage2) == int(len(stage1) * 0.09)
    for got in engine_results["pyramiddrop"]:
        assert [len(s["kept"]) for s in got["record"]["stages"]] == [288, 144, 72]


