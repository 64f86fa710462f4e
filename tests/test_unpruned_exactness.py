"""Unpruned, FeatherLlava must be vLLM's stock LLaVA (and transformers')."""

from __future__ import annotations

import pytest

from tests.helpers import PROMPTS, chat, make_llm, shutdown, sample_images

MAX_TOKENS = 16


def _generate(llm, extra_args=None):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0,
                            ignore_eos=True, extra_args=extra_args)
    convs = [chat(img, p) for img in sample_images() for p in PROMPTS]
    outs = llm.chat(convs, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
             list(o.prompt_token_ids)) for o in outs]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint):
    """Stock LLaVA, then FeatherLlava with pruning off (default and explicit)."""
    stock = make_llm(tiny_checkpoint, stock=True)
    try:
        stock_out = _generate(stock)
    finally:
        shutdown(stock)
    feather = make_llm(tiny_checkpoint)
    try:
        arch = type(feather.llm_engine.model_executor.driver_worker.worker.model_runner.model).__name__
        default_out = _generate(feather)
        none_out = _generate(feather, {"feather": "none"})
    finally:
        shutdown(feather)
    return {"stock": stock_out, "default": default_out, "none": none_out, "arch": arch}


def test_plugin_class_serves(runs):
    assert runs["arch"] == "FeatherLlavaForConditionalGeneration"


@pytest.mark.parametrize("variant", ["default", "none"])
def test_unpruned_equals_stock_vllm(runs, variant):
    assert len(runs["stock"]) == 6  # 3 images x 2 prompts
    for (s_tok, s_lp, s_prompt), (f_tok, f_lp, f_prompt) in zip(runs["stock"], runs[variant]):
        assert f_prompt == s_prompt
        assert len(s_tok) == MAX_TOKENS
        assert f_tok == s_tok
        assert max(abs(a - b) for a, b in zip(s_lp, f_lp)) < 1e-4


def test_greedy_tokens_equal_transformers(runs, tiny_checkpoint):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    i = 0
    for image in sample_images():
        for prompt in PROMPTS:
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True)
            inputs = processor(images=image, text=text, return_tensors="pt")
            vllm_tokens, _, vllm_prompt = runs["stock"][i]
            assert inputs["input_ids"][0].tolist() == vllm_prompt
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False,
                                     min_new_tokens=MAX_TOKENS)
            assert out[0, inputs["input_ids"].shape[1]:].tolist() == vllm_tokens
            i += 1
