"""FEATHER on LLaVA-NeXT (v1.6): an image is a base view and a tile map
with a newline token after each row, its token count set by its size.

One engine (fp32, eager, chunked prefill on with a step budget that splits
every prompt's text from its image) serves every case under every preset
in one batch, on a tiny NeXT built here (112-pixel CLIP tower: an 8 x 8
base view, NeXT's default tile grids scaled to it). Unpruned, its greedy
tokens and logprobs are transformers'; pruned, its kept sets per stage and
image equal the transformers reference (tests/reference_hf.py, whose
newline positions are checked against transformers' own packing) for
images of several sizes and aspect ratios (different tile grids) and two
images of different sizes in one prompt."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from feather_vllm.kv.plan import report_of
from feather_vllm.pruning.config import PRESETS, resolve
from feather_vllm.pruning.layout import ImageLayout, LayoutRule, layout_kept_per_stage_bounds
from tests.helpers import engine_parts, make_llm, shutdown
from tests.reference_hf import reference_generate

MAX_TOKENS = 8
BLOCK = 32
PRUNED = ["fastv", "feather", "pyramiddrop"]
# ~600 tokens of text before the images: with the step budget below, every
# prompt's prefill takes two steps (the text, then the images and question).
PREAMBLE = " ".join(["the picture shows one small object on a grey ground"] * 50)
STEP_BUDGET = 640
# The checkpoint's tile grids: NeXT's five, for a 112-pixel tower.
PINPOINTS = ((112, 224), (224, 112), (224, 224), (336, 112), (112, 336))
# (image sizes (height, width), question): the tile grid each size picks is in the id.
CASES = {
    "square-2x2": ([(224, 224)], "Where is the red square?"),
    "wide-1x3": ([(120, 330)], "Where is the red square?"),
    "tall-3x1": ([(330, 120)], "Describe the picture in one word."),
    "small-1x2": ([(60, 90)], "Where is the red square?"),
    "two-images": ([(224, 224), (120, 330)], "Where is the red square?"),
}


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    """A noisy picture of `size` (height, width) with a red square."""
    height, width = size
    rng = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=rng, dtype=torch.uint8)
    pixels[height // 4:height // 2, width // 2:3 * width // 4] = torch.tensor([220, 30, 30], dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _images(case: str) -> list[Image.Image]:
    return [_image(size, seed) for seed, size in enumerate(CASES[case][0])]


def _parts(case: str) -> list[dict]:
    return [{"type": "text", "text": PREAMBLE}, *({"type": "image"} for _ in CASES[case][0]),
            {"type": "text", "text": CASES[case][1]}]


def _with_images(case: str) -> list[tuple[dict, Image.Image | None]]:
    images = iter(_images(case))
    return [(p, next(images) if p["type"] == "image" else None) for p in _parts(case)]


FOLLOW_UP = "Where is the blue circle?"  # turn 2 of a feather conversation about the square-2x2 image


@pytest.fixture(scope="module")
def engine_results(next_checkpoint):
    """Every case under `none` and every pruned preset, one batch (prefix
    caching on, as vLLM's default); then turn 2 of the feather
    conversation about the square-2x2 image."""
    from vllm import SamplingParams

    engine = dict(block_size=BLOCK, max_model_len=2048, max_num_batched_tokens=STEP_BUDGET,
                  enable_chunked_prefill=True, limit_mm_per_prompt={"image": 2})
    convs = {case: [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": image} if p["type"] == "image" else p
        for p, image in _with_images(case)]}] for case in CASES}
    stock = make_llm(next_checkpoint, stock=True, **engine)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
        stock_outs = stock.chat(list(convs.values()), params, use_tqdm=False)
    finally:
        shutdown(stock)
    llm = make_llm(next_checkpoint, enable_prefix_caching=True, **engine)
    try:
        presets = ["none", *PRUNED]
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True,
                                 extra_args={"feather": preset}) for preset in presets for _ in CASES]
        outs = llm.chat([convs[case] for _ in presets for case in CASES], params, use_tqdm=False)
        turn1 = outs[presets.index("feather") * len(CASES) + list(CASES).index("square-2x2")]
        turn2 = llm.chat([*convs["square-2x2"], {"role": "assistant", "content": turn1.outputs[0].text},
                          {"role": "user", "content": FOLLOW_UP}],
                         SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True,
                                        extra_args={"feather": "feather"}), use_tqdm=False)[0]
        scheduler = engine_parts(llm)[0]
        layout_rule = scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups[0].kv_cache_spec.feather_layout
        steps = scheduler.max_num_scheduled_tokens
    finally:
        shutdown(llm)
    results = {(presets[i // len(CASES)], list(CASES)[i % len(CASES)]): _result(out) for i, out in enumerate(outs)}
    results.update({("stock", case): _result(out) for case, out in zip(CASES, stock_outs)})
    results["turn2"] = {**_result(turn2), "prompt_token_ids": list(turn2.prompt_token_ids),
                        "turn1_prompt_len": len(turn1.prompt_token_ids)}
    return {"results": results, "layout_rule": layout_rule, "step_budget": steps}


def _result(out) -> dict:
    tokens = list(out.outputs[0].token_ids)
    return {"token_ids": tokens, "report": report_of(out), "prompt_len": len(out.prompt_token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]}


@pytest.fixture(scope="module")
def reference(next_checkpoint):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(next_checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(next_checkpoint, dtype=torch.float32).eval()
    out = {}
    for case in CASES:
        text = processor.apply_chat_template([{"role": "user", "content": _parts(case)}], add_generation_prompt=True)
        inputs = processor(images=_images(case), text=text, return_tensors="pt")
        for preset in ["none", *PRUNED]:
            out[preset, case] = reference_generate(model, inputs["input_ids"], inputs["pixel_values"],
                                                   resolve(preset), MAX_TOKENS, image_sizes=inputs["image_sizes"])
            out[preset, case]["prompt_len"] = inputs["input_ids"].shape[1]
    return out


def _layouts(case: str) -> list[ImageLayout]:
    return [ImageLayout.llava_next(size, grid_pinpoints=PINPOINTS, vision_image_size=112) for size in CASES[case][0]]


def test_engine_carries_the_checkpoints_layout_rule(engine_results):
    assert engine_results["layout_rule"] == LayoutRule(
        "llava_next", 112, 14, PINPOINTS)
    assert engine_results["step_budget"] == STEP_BUDGET


@pytest.mark.parametrize("case", list(CASES))
def test_unpruned_is_vllms_own_model(engine_results, reference, case):
    """Pruning off, FEATHER's class is vLLM's LlavaNextForConditionalGeneration
    (same tokens, logprobs within 1e-4: the two engines batch differently),
    and both give transformers' greedy tokens. Their logprobs differ from
    transformers' by up to ~1.5e-4 on this checkpoint (random weights, init
    std 0.3: logits of tens), vLLM's own class as much as FEATHER's."""
    got, stock, ref = (engine_results["results"]["none", case], engine_results["results"]["stock", case],
                       reference["none", case])
    assert got["prompt_len"] == stock["prompt_len"] == ref["prompt_len"]
    assert got["prompt_len"] > STEP_BUDGET  # the prefill took two steps
    assert got["token_ids"] == stock["token_ids"] == ref["token_ids"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"], stock["logprobs"])) < 1e-4
    assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"])) < 5e-4
    assert got["report"].image_tokens == tuple(layout.num_tokens for layout in _layouts(case))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("preset", PRUNED)
def test_kept_sets_are_the_references(engine_results, reference, preset, case):
    got, ref = engine_results["results"][preset, case], reference[preset, case]
    report = got["report"]
    assert report.fallback is None
    assert [stage.layer for stage in report.stages] == list(PRESETS[preset].cut_layers)
    assert [[list(k) for k in stage.per_image] for stage in report.stages] == ref["kept"]
    assert got["token_ids"] == ref["token_ids"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"])) < 1e-3


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("preset", PRUNED)
def test_every_stage_keeps_the_newlines_and_its_bounds(engine_results, preset, case):
    """The stated rule: newline tokens are kept at every stage; the rest
    lies within the layout's bounds (top-k of the raster tokens, plus the
    grid laid on each region)."""
    report = engine_results["results"][preset, case]["report"]
    for layout, per_stage in zip(_layouts(case), zip(*(stage.per_image for stage in report.stages))):
        newlines = set(layout.newline_indices().tolist())
        bounds = layout_kept_per_stage_bounds(PRESETS[preset], layout)
        for kept, bound in zip(per_stage, bounds):
            assert newlines <= set(kept)
            assert bound.lo <= len(kept) <= bound.hi


# -- through the gateway --------------------------------------------------------

GATEWAY_CASES = ["square-2x2", "wide-1x3"]


@pytest.fixture(scope="module")
def gateway(next_checkpoint):
    """`python -m server --model` on the NeXT checkpoint (vLLM's defaults otherwise)."""
    from tests.helpers import ServerProcess

    proc = ServerProcess(next_checkpoint, "--served-model-name", "next", max_model_len=2048)
    yield proc
    proc.stop()


def _gateway_chat(gateway, case: str, **extra) -> dict:
    import httpx

    from tests.helpers import png_data_url

    content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}} if image is not None else part
               for part, image in _with_images(case)]
    body = {"model": "next", "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True, **extra}
    r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("case", GATEWAY_CASES)
@pytest.mark.parametrize("preset", ["none", "feather"])
def test_gateway_serves_next_as_the_engine(gateway, engine_results, preset, case):
    """The gateway loads FEATHER's NeXT class by --model alone; its greedy
    tokens and kept sets are the offline engine's."""
    body = _gateway_chat(gateway, case, feather={"preset": preset, "return_kept": True})
    want = engine_results["results"][preset, case]
    assert body["choices"][0]["token_ids"] == want["token_ids"]
    report = body["feather"]
    if preset == "none":
        assert report is None or report["stages"] == []
        return
    kept = [[s["kept_indices"] for s in image["stages"]] for image in report["images"]]
    assert kept == [list(map(list, per_image)) for per_image in zip(*(s.per_image for s in want["report"].stages))]


def test_gateway_reports_kept_tokens_per_region(gateway):
    """Per stage: each region's kept count and kept map in its own raster
    (row * cols + col), and the newline tokens kept (all of them)."""
    body = _gateway_chat(gateway, "wide-1x3", feather={"preset": "feather", "return_kept": True})
    (image,) = body["feather"]["images"]
    (layout,) = _layouts("wide-1x3")
    base, tiles = layout.regions
    assert (base.rows, base.cols, tiles.rows, tiles.cols, tiles.newline) == (8, 8, 8, 22, True)
    assert image["image_tokens"] == layout.num_tokens == 64 + 8 * 23
    for stage in image["stages"]:
        kept = stage["kept_indices"]
        regions = {r["name"]: r for r in stage["regions"]}
        assert [(r["rows"], r["cols"]) for r in regions.values()] == [(8, 8), (8, 22)]
        assert regions["base"]["kept_indices"] == [i for i in kept if i < 64]
        assert regions["tiles"]["kept_indices"] == [(i - 64) // 23 * 22 + (i - 64) % 23 for i in kept
                                                    if i >= 64 and (i - 64) % 23 != 22]
        assert stage["newlines_kept"] == 8
        assert stage["kept"] == regions["base"]["kept"] + regions["tiles"]["kept"] + 8
        assert stage["mean_row"] is None and 0 <= regions["tiles"]["mean_row"] <= 1


def test_analyze_tool_maps_kept_tokens_per_region(next_checkpoint, tmp_path):
    """`python -m feather_vllm.tools.analyze` on a NeXT checkpoint: the
    engine's kept sets, per region in each region's raster, and a picture."""
    from feather_vllm.tools.analyze import main

    image = tmp_path / "wide.png"
    _image((120, 330), 0).save(image)
    out, png = tmp_path / "kept.json", tmp_path / "kept.png"
    main(["--model", str(next_checkpoint), "--image", str(image), "--prompt", "Where is the red square?",
          "--preset", "feather", "--json", str(out), "--png", str(png), "--max-tokens", "2"])
    import json

    report = json.loads(out.read_text())
    (layout,) = _layouts("wide-1x3")
    assert report["regions"] == [{"name": r.name, "rows": r.rows, "cols": r.cols, "newline": r.newline}
                                 for r in layout.regions]
    for stage in report["stages"]:
        maps = {name: r["kept_indices"] for name, r in stage["regions"].items()}
        assert maps["base"] == [i for i in stage["kept"] if i < 64]
        assert len(maps["tiles"]) + len(maps["base"]) + stage["newlines_kept"] == stage["num_kept"]
        assert stage["newlines_kept"] == 8
    assert png.stat().st_size > 10_000


def test_benchmark_cost_model_counts_the_images_layout(next_checkpoint):
    """`python -m loadtest.benchmark --image-size` on a NeXT checkpoint
    predicts with the image's layout: its token count and its stage bounds
    (top-k + per-region grid + newlines), not LLaVA-1.5's 576."""
    from feather_vllm.pruning.cost import flops_ratio
    from feather_vllm.pruning.layout import layout_kept_per_stage_max
    from loadtest.benchmark import predictions

    (layout,) = _layouts("square-2x2")  # a 224-pixel square: 2 x 2 tiles, 336 tokens
    pred = predictions(str(next_checkpoint), 224)
    for preset in PRUNED:
        kept = layout_kept_per_stage_max(PRESETS[preset], layout)
        assert pred[preset]["prefill_short"] == pytest.approx(
            flops_ratio(PRESETS[preset], 32, 64, 128, layout.num_tokens, 15, kept))
    assert layout.num_tokens == 336 and layout_kept_per_stage_max(PRESETS["feather"], layout)[1] < 336 * 0.2



def test_follow_up_turn_reuses_the_pruned_image(engine_results, next_checkpoint):
    """Turn 2 of a feather conversation about a NeXT image takes turn 1's
    pruned KV from the prefix cache (its kept set, no new cut) and gives
    the reference's tokens with turn 1's kept sets forced."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    results = engine_results["results"]
    turn1, turn2 = results["feather", "square-2x2"], results["turn2"]
    report = turn2["report"]
    assert report.reused is not None and report.reused.tokens >= turn2["turn1_prompt_len"] // BLOCK * BLOCK
    assert report.stages == turn1["report"].stages
    processor = AutoProcessor.from_pretrained(next_checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(next_checkpoint, dtype=torch.float32).eval()
    inputs = processor.image_processor(_images("square-2x2"), return_tensors="pt")
    ids = torch.tensor([turn2["prompt_token_ids"]])
    kept = [[list(k) for k in stage.per_image] for stage in turn1["report"].stages]
    want = reference_generate(model, ids, inputs["pixel_values"], PRESETS["feather"], MAX_TOKENS, kept=kept,
                              image_sizes=inputs["image_sizes"])
    assert turn2["token_ids"] == want["token_ids"]
