"""What the anyres models' tests share (LLaVA-NeXT, LLaVA-OneVision): their
pictures, their prompts, one engine run of every case under every preset,
and the transformers reference of the same cases.

Each family's module runs one engine (fp32, eager, chunked prefill on with
a step budget that splits every prompt's text from its images) on every
case under every preset in one batch, then turn 2 of a feather
conversation about one case's image, and compares with the reference
(tests/reference_hf.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from feather_vllm.kv.plan import report_of
from feather_vllm.pruning.config import PRESETS, resolve
from feather_vllm.pruning.layout import layout_kept_per_stage_bounds
from tests.helpers import engine_parts, make_llm, shutdown
from tests.reference_hf import kept_lists, reference_generate

MAX_TOKENS = 8
BLOCK = 32
PRUNED = ["fastv", "feather", "pyramiddrop"]
PRESET_NAMES = ["none", *PRUNED]
# ~600 tokens of text before the images: with a step budget above the
# largest case's images and question and below each whole prompt, every
# prompt's prefill takes two steps (the text, then the images and question).
PREAMBLE = " ".join(["the picture shows one small object on a grey ground"] * 50)
STEP_BUDGET = 640
FOLLOW_UP = "Where is the blue circle?"  # turn 2 of a feather conversation

# case name -> (image sizes (height, width), question)
Cases = dict[str, tuple[list[tuple[int, int]], str]]


def image(size: tuple[int, int], seed: int) -> Image.Image:
    """A noisy picture of `size` (height, width) with a red square."""
    height, width = size
    rng = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=rng, dtype=torch.uint8)
    pixels[height // 4:height // 2, width // 2:3 * width // 4] = torch.tensor([220, 30, 30], dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def images(cases: Cases, case: str) -> list[Image.Image]:
    return [image(size, seed) for seed, size in enumerate(cases[case][0])]


def parts(cases: Cases, case: str) -> list[dict]:
    """The user turn's content parts: the preamble, the images, the question."""
    return [{"type": "text", "text": PREAMBLE}, *({"type": "image"} for _ in cases[case][0]),
            {"type": "text", "text": cases[case][1]}]


def with_images(cases: Cases, case: str) -> list[tuple[dict, Image.Image | None]]:
    """Each content part with its picture (None for text)."""
    pictures = iter(images(cases, case))
    return [(p, next(pictures) if p["type"] == "image" else None) for p in parts(cases, case)]


def result(out: Any) -> dict:
    tokens = list(out.outputs[0].token_ids)
    return {"token_ids": tokens, "report": report_of(out), "prompt_len": len(out.prompt_token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]}


def run_engine(checkpoint: Path, cases: Cases, follow_up_case: str, step_budget: int = STEP_BUDGET,
               **engine: Any) -> dict:
    """Every case on vLLM's own class, then on FEATHER's under every preset
    in one batch (prefix caching on, as vLLM's default), then turn 2 of the
    feather conversation about `follow_up_case`. Returns {"results":
    {(preset or "stock", case) or "turn2": result}, "layout_rule",
    "step_budget"}."""
    from vllm import SamplingParams

    engine = dict(block_size=BLOCK, max_model_len=2048, max_num_batched_tokens=step_budget,
                  enable_chunked_prefill=True, **engine)
    convs = {case: [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": picture} if p["type"] == "image" else p
        for p, picture in with_images(cases, case)]}] for case in cases}

    def params(preset: str | None = None):
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True,
                              extra_args=None if preset is None else {"feather": preset})

    stock = make_llm(checkpoint, stock=True, **engine)
    try:
        stock_outs = stock.chat(list(convs.values()), params(), use_tqdm=False)
    finally:
        shutdown(stock)
    llm = make_llm(checkpoint, enable_prefix_caching=True, **engine)
    try:
        outs = llm.chat([convs[case] for _ in PRESET_NAMES for case in cases],
                        [params(preset) for preset in PRESET_NAMES for _ in cases], use_tqdm=False)
        turn1 = outs[PRESET_NAMES.index("feather") * len(cases) + list(cases).index(follow_up_case)]
        turn2 = llm.chat([*convs[follow_up_case], {"role": "assistant", "content": turn1.outputs[0].text},
                          {"role": "user", "content": FOLLOW_UP}], params("feather"), use_tqdm=False)[0]
        scheduler = engine_parts(llm)[0]
        layout_rule = scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups[0].kv_cache_spec.feather_layout
        steps = scheduler.max_num_scheduled_tokens
    finally:
        shutdown(llm)
    results = {(PRESET_NAMES[i // len(cases)], list(cases)[i % len(cases)]): result(out)
               for i, out in enumerate(outs)}
    results.update({("stock", case): result(out) for case, out in zip(cases, stock_outs)})
    results["turn2"] = {**result(turn2), "prompt_token_ids": list(turn2.prompt_token_ids),
                        "turn1_prompt_len": len(turn1.prompt_token_ids)}
    return {"results": results, "layout_rule": layout_rule, "step_budget": steps}


def load_reference(model_class: Any, checkpoint: Path) -> tuple[Any, Any]:
    """(processor, model) of `checkpoint` in transformers, fp32."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint), model_class.from_pretrained(checkpoint, dtype=torch.float32).eval()


def reference(model_class: Any, checkpoint: Path, cases: Cases) -> dict:
    """The transformers reference of every case under every preset."""
    processor, model = load_reference(model_class, checkpoint)
    out = {}
    for case in cases:
        text = processor.apply_chat_template([{"role": "user", "content": parts(cases, case)}],
                                             add_generation_prompt=True)
        inputs = processor(images=images(cases, case), text=text, return_tensors="pt")
        for preset in PRESET_NAMES:
            out[preset, case] = reference_generate(model, inputs["input_ids"], inputs["pixel_values"],
                                                   resolve(preset), MAX_TOKENS, image_sizes=inputs["image_sizes"])
            out[preset, case]["prompt_len"] = inputs["input_ids"].shape[1]
    return out


def follow_up_reference(model_class: Any, checkpoint: Path, cases: Cases, case: str, turn1: dict,
                        turn2: dict) -> dict:
    """The reference of turn 2 (its prompt's token ids) with turn 1's kept
    sets forced."""
    processor, model = load_reference(model_class, checkpoint)
    inputs = processor.image_processor(images(cases, case), return_tensors="pt")
    kept = kept_lists(turn1["report"].stages)
    return reference_generate(model, torch.tensor([turn2["prompt_token_ids"]]), inputs["pixel_values"],
                              resolve("feather"), MAX_TOKENS, kept=kept, image_sizes=inputs["image_sizes"])


# -- the checks both families make ----------------------------------------------

def check_unpruned(got: dict, stock: dict, ref: dict, layouts: list, step_budget: int) -> None:
    """Pruning off, FEATHER's class is vLLM's own (same tokens, logprobs
    within 1e-4: the two engines batch differently), and both give
    transformers' greedy tokens (logprobs within 5e-4: these random
    checkpoints have logits of tens)."""
    assert got["prompt_len"] == stock["prompt_len"] == ref["prompt_len"]
    assert got["prompt_len"] > step_budget  # the prefill took two steps
    assert got["token_ids"] == stock["token_ids"] == ref["token_ids"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"], stock["logprobs"])) < 1e-4
    assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"])) < 5e-4
    assert got["report"].image_tokens == tuple(layout.num_tokens for layout in layouts)


def check_kept_sets(got: dict, ref: dict, preset: str) -> None:
    """Kept sets per stage and image, tokens and logprobs: the reference's."""
    report = got["report"]
    assert report.fallback is None
    assert [stage.layer for stage in report.stages] == list(PRESETS[preset].cut_layers)
    assert kept_lists(report.stages) == ref["kept"]
    assert got["token_ids"] == ref["token_ids"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"])) < 1e-3


def check_newlines_and_bounds(report: Any, layouts: list, preset: str) -> None:
    """The stated rule: newline tokens are kept at every stage; the rest
    lies within the layout's bounds (top-k of the raster tokens, plus the
    grid laid on each region)."""
    for layout, per_stage in zip(layouts, zip(*(stage.per_image for stage in report.stages))):
        newlines = set(layout.newline_indices().tolist())
        bounds = layout_kept_per_stage_bounds(PRESETS[preset], layout)
        for kept, bound in zip(per_stage, bounds):
            assert newlines <= set(kept)
            assert bound.lo <= len(kept) <= bound.hi


def check_follow_up(turn1: dict, turn2: dict, want: dict) -> None:
    """Turn 2 took turn 1's pruned KV from the prefix cache (its kept set,
    no new cut) and gives `want`, the reference with those kept sets."""
    report = turn2["report"]
    assert report.reused is not None and report.reused.tokens >= turn2["turn1_prompt_len"] // BLOCK * BLOCK
    assert report.stages == turn1["report"].stages
    assert turn2["token_ids"] == want["token_ids"]
