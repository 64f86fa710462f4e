"""Pruning inside vLLM's prefill equals an independent transformers reference:
kept indices per stage, greedy tokens and logprobs, for every preset, with
mixed batches; the unpruned requests of a mixed batch stay stock. In each
engine mode, a follow-up turn that adds back to turn 1's pruned KV equals
its reference too."""

from __future__ import annotations

import pytest
import torch

from feather_vllm.kv.plan import report_of
from feather_vllm.pruning.config import resolve
from tests.helpers import PROMPTS, chat, engine_parts, make_llm, sample_images, shutdown
from tests.reference_hf import kept_lists, reference_generate

MAX_TOKENS = 16
PRUNED = ["fastv", "feather", "pyramiddrop"]


def _params(preset):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True,
                          extra_args={"feather": preset})


def _result(output):
    tokens = list(output.outputs[0].token_ids)
    return {
        "token_ids": tokens,
        "logprobs": [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, tokens)],
        "report": report_of(output),
    }


@pytest.fixture(scope="module")
def cases():
    return [(i, image, prompt) for i, image in enumerate(sample_images()) for prompt in PROMPTS]


# The engine modes users get: eager single-process (the fast default here),
# compiled (vLLM's default: torch.compile, CUDA graphs on GPU; decode steps
# run the compiled stock forward with pruned metadata), and the
# multi-process executor (plans and kept tokens cross process boundaries,
# pickled with the scheduler and runner outputs).
MODES = {
    "eager": {},
    "compiled": {"enforce_eager": False},
    "multiprocess": {"distributed_executor_backend": "mp"},
}


@pytest.fixture(scope="module")
def stock_results(tiny_checkpoint, cases):
    from vllm import SamplingParams

    stock = make_llm(tiny_checkpoint, stock=True)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
        return [_result(o) for o in stock.chat([chat(img, p) for _, img, p in cases], params, use_tqdm=False)]
    finally:
        shutdown(stock)


@pytest.fixture(scope="module", params=list(MODES))
def engine_results(request, tiny_checkpoint, cases, stock_results):
    """One mixed batch: every (image, prompt) under every preset together."""
    llm = make_llm(tiny_checkpoint, enable_prefix_caching=True, **MODES[request.param])
    try:
        convs, params = [], []
        for preset in ["none", *PRUNED]:
            for _, img, p in cases:
                convs.append(chat(img, p))
                params.append(_params(preset))
        outs = llm.chat(convs, params, use_tqdm=False)
        results = [_result(o) for o in outs]
        add_back = _add_back_turns(llm)
        cutting_ops = None if request.param == "multiprocess" else _cutting_ops(engine_parts(llm)[2])
        rewarmed_ops = None if request.param == "multiprocess" else _rewarmed_ops(engine_parts(llm)[2])
    finally:
        shutdown(llm)
    n = len(cases)
    by_preset = {preset: results[i * n:(i + 1) * n] for i, preset in enumerate(["none", *PRUNED])}
    return {"mode": request.param, "stock": stock_results, "cutting_ops": cutting_ops,
            "rewarmed_ops": rewarmed_ops, "add_back": add_back, **by_preset}


ADD_BACK = {"preset": "fastv", "follow_up": "add_back"}
FOLLOW_UP = "And the blue circle?"


def _add_back_turns(llm) -> list:
    """A fastv conversation whose turn 2 adds back to turn 1's pruned KV
    (the prefix cache is on in every mode for it). Turn 1 repeats the
    batch's first fastv prompt and cuts again: a hit never takes a prompt's
    last token, and the compact KV before it ends short of the image."""
    image, prompt = sample_images()[0], PROMPTS[0]
    first = llm.chat(chat(image, prompt), _params(ADD_BACK), use_tqdm=False)[0]
    follow_up = chat(image, prompt) + [{"role": "assistant", "content": first.outputs[0].text},
                                       {"role": "user", "content": FOLLOW_UP}]
    return [first, llm.chat(follow_up, _params(ADD_BACK), use_tqdm=False)[0]]


def _cutting_ops(model) -> dict[str, int | None]:
    """How the cutting step ran its layers: the number of graphs Dynamo
    compiled for each piece, or None where they ran uncompiled."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from feather_vllm import cutting_layer

    layers = model._layers
    return {name: None if getattr(layers, f"_{name}") is fn else len(_debug_get_cache_entry_list(fn))
            for name, fn in (("norm_qkv", cutting_layer._norm_qkv), ("rope", cutting_layer._rope),
                             ("pre_attention", cutting_layer._pre_attention),
                             ("post_attention", cutting_layer._post_attention))}


def _rewarmed_ops(model) -> dict[str, int | None]:
    """`_cutting_ops` after warming up again under a bf16 default dtype, as
    vLLM loads a bf16 model (the steps run under float32's): the graphs of
    the first warm-up serve, none is added."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model._layers.warm_up()
    finally:
        torch.set_default_dtype(default)
    return _cutting_ops(model)


# Per mode: a layer's input norm + QKV projection + RoPE (with and without a
# residual) and its output projection + norm + MLP each compiled once for
# every layer and every token count, and so are the scoring layer's norm +
# QKV projection (with and without a residual) and RoPE; the eager engine
# calls vLLM's ops as is.
CUTTING_OPS = {
    "eager": {"norm_qkv": None, "rope": None, "pre_attention": None, "post_attention": None},
    "compiled": {"norm_qkv": 2, "rope": 1, "pre_attention": 2, "post_attention": 1},
    "multiprocess": None,
}


def test_cutting_step_ops_compiled_like_the_engine(engine_results):
    assert engine_results["cutting_ops"] == CUTTING_OPS[engine_results["mode"]]


def test_cutting_step_graphs_compiled_at_load_serve_the_steps(engine_results):
    """Warm-up compiles under the steps' global state (Dynamo guards on the
    default dtype, which vLLM sets to the model's while it loads): without
    that, a bf16 engine compiled every graph again on its first pruned request."""
    assert engine_results["rewarmed_ops"] == CUTTING_OPS[engine_results["mode"]]


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
        assert got["report"].fallback is None
        assert [stage.layer for stage in got["report"].stages] == list(resolve(preset).cut_layers)
        assert kept_lists(got["report"].stages) == ref["kept"]


@pytest.mark.parametrize("preset", PRUNED)
def test_tokens_and_logprobs_equal_reference(engine_results, reference, preset):
    for got, ref in zip(engine_results[preset], reference[preset]):
        assert len(got["token_ids"]) == MAX_TOKENS
        assert got["token_ids"] == ref["token_ids"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"])) < 1e-3


def test_add_back_equals_reference(engine_results, hf):
    """Turn 2 reuses turn 1's pruned KV and adds back fastv's keep count
    of what turn 1 dropped, as its own criterion ranks them: probes through
    the layers before the cut (compiled like a cut's layers in the compiled
    engine), a plan and kept tokens across processes in the multi-process
    one; tokens and kept sets equal the reference."""
    from tests.reference_hf import reference_add_back

    processor, model = hf
    first, second = engine_results["add_back"]
    report = report_of(second)
    assert report.reused is not None and report.reused.added == 144
    pixels = processor.image_processor(images=sample_images()[0], return_tensors="pt")["pixel_values"]
    want = reference_add_back(model, torch.tensor([second.prompt_token_ids]), pixels, resolve("fastv"), MAX_TOKENS,
                              kept_lists(report_of(first).stages), report.reused.tokens, 144)
    assert kept_lists(report.stages) == want["kept"]
    assert list(second.outputs[0].token_ids) == want["token_ids"]


def test_presets_change_outputs(engine_results):
    """Pruning is not a no-op on this checkpoint (else the tests above prove little)."""
    for preset in PRUNED:
        assert [r["token_ids"] for r in engine_results[preset]] != \
            [r["token_ids"] for r in engine_results["none"]]


def test_unpruned_requests_in_mixed_batch_are_stock(engine_results):
    # The stock engine runs eager; inductor's fused kernels (compiled mode)
    # round differently, by up to ~3e-4 here in fp32.
    tolerance = 1e-3 if engine_results["mode"] == "compiled" else 1e-4
    for got, stock in zip(engine_results["none"], engine_results["stock"]):
        assert got["token_ids"] == stock["token_ids"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], stock["logprobs"])) < tolerance
        assert got["report"].preset == "none" and got["report"].stages == () and got["report"].fallback is None
        assert got["report"].kv_blocks_held == got["report"].kv_blocks_unpruned


def test_kept_counts_follow_the_schedule(engine_results):
    """FastV keeps int(576 * 0.25); FEATHER's stage 1 is top-int(576 * 0.3)
    union the 64-token grid and stage 2 keeps int(N1 * 0.09) of those."""
    from feather_vllm.pruning.selection import uniform_grid

    grid = set(uniform_grid(576, 3).tolist())
    for got in engine_results["fastv"]:
        assert [stage.total for stage in got["report"].stages] == [144]
    for got in engine_results["feather"]:
        stage1, stage2 = (stage.per_image[0] for stage in got["report"].stages)
        assert grid <= set(stage1) and 172 <= len(stage1) <= 172 + 64
        assert set(stage2) <= set(stage1) and len(stage2) == int(len(stage1) * 0.09)
    for got in engine_results["pyramiddrop"]:
        assert [stage.total for stage in got["report"].stages] == [288, 144, 72]


