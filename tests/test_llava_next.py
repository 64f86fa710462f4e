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

from feather_vllm.pruning.config import PRESETS
from feather_vllm.pruning.layout import ImageLayout, LayoutRule
from tests import anyres
from tests.anyres import PRUNED, STEP_BUDGET

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
FOLLOW_UP_CASE = "square-2x2"


@pytest.fixture(scope="module")
def engine_results(next_checkpoint):
    return anyres.run_engine(next_checkpoint, CASES, FOLLOW_UP_CASE, limit_mm_per_prompt={"image": 2})


@pytest.fixture(scope="module")
def reference(next_checkpoint):
    from transformers import LlavaNextForConditionalGeneration

    return anyres.reference(LlavaNextForConditionalGeneration, next_checkpoint, CASES)


def _layouts(case: str) -> list[ImageLayout]:
    return [ImageLayout.llava_next(size, grid_pinpoints=PINPOINTS, vision_image_size=112) for size in CASES[case][0]]


def test_engine_carries_the_checkpoints_layout_rule(engine_results):
    assert engine_results["layout_rule"] == LayoutRule(
        "llava_next", 112, 14, PINPOINTS)
    assert engine_results["step_budget"] == STEP_BUDGET


@pytest.mark.parametrize("case", list(CASES))
def test_unpruned_is_vllms_own_model(engine_results, reference, case):
    """Pruning off, FEATHER's class is vLLM's LlavaNextForConditionalGeneration
    and both give transformers' greedy tokens (anyres.check_unpruned)."""
    results = engine_results["results"]
    anyres.check_unpruned(results["none", case], results["stock", case], reference["none", case], _layouts(case),
                          STEP_BUDGET)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("preset", PRUNED)
def test_kept_sets_are_the_references(engine_results, reference, preset, case):
    anyres.check_kept_sets(engine_results["results"][preset, case], reference[preset, case], preset)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("preset", PRUNED)
def test_every_stage_keeps_the_newlines_and_its_bounds(engine_results, preset, case):
    anyres.check_newlines_and_bounds(engine_results["results"][preset, case]["report"], _layouts(case), preset)


# -- the tools (the gateway's per-region report is tested on OneVision: tests/test_llava_onevision.py) --

def test_analyze_tool_maps_kept_tokens_per_region(next_checkpoint, tmp_path):
    """`python -m feather_vllm.tools.analyze` on a NeXT checkpoint: the
    engine's kept sets, per region in each region's raster, and a picture."""
    from feather_vllm.tools.analyze import main

    image = tmp_path / "wide.png"
    anyres.image((120, 330), 0).save(image)
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
    from transformers import LlavaNextForConditionalGeneration

    results = engine_results["results"]
    turn1, turn2 = results["feather", FOLLOW_UP_CASE], results["turn2"]
    want = anyres.follow_up_reference(LlavaNextForConditionalGeneration, next_checkpoint, CASES, FOLLOW_UP_CASE,
                                      turn1, turn2)
    anyres.check_follow_up(turn1, turn2, want)
