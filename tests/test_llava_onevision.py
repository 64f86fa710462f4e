"""FEATHER on LLaVA-OneVision (Qwen2 decoder, SigLIP tower, anyres_max_9):
an image is a base view and a tile map with a newline token after each
row; a map above 9 tiles' worth of tokens is interpolated down first.

One engine (fp32, eager, chunked prefill splitting every prompt's text
from its images) serves every case under every preset in one batch, on a
tiny OneVision built here (112-pixel SigLIP: an 8 x 8 base view,
OneVision's 1x1 to 6x6 tile grids scaled to it). Unpruned, its greedy
tokens are vLLM's own class's and transformers'; pruned, its kept sets per
stage and image equal the transformers reference (tests/reference_hf.py)
for tile grids with and without interpolation, a square and a non-square
interpolated map, and two images in one prompt."""

from __future__ import annotations

import pytest

from feather_vllm.pruning.layout import ImageLayout, LayoutRule
from tests import anyres
from tests.anyres import MAX_TOKENS, PRUNED

STEP_BUDGET = 704  # above the largest case's images and question (~680), below every prompt
PINPOINTS = tuple((112 * h, 112 * w) for h in range(1, 7) for w in range(1, 7))
# (image sizes (height, width), question): the tile grid each size picks and
# the map it interpolates to (rows x cols) are in the id.
CASES = {
    "square-2x2": ([(224, 224)], "Where is the red square?"),
    "wide-2x3": ([(120, 330)], "Where is the red square?"),
    "small-1x1": ([(60, 90)], "Describe the picture in one word."),
    "interpolated-6x6-to-24x24": ([(672, 672)], "Where is the red square?"),
    "interpolated-6x2-to-41x13": ([(900, 300)], "Where is the red square?"),
    "two-images": ([(224, 224), (120, 330)], "Where is the red square?"),
}
FOLLOW_UP_CASE = "interpolated-6x6-to-24x24"


@pytest.fixture(scope="module")
def engine_results(onevision_checkpoint):
    return anyres.run_engine(onevision_checkpoint, CASES, FOLLOW_UP_CASE, step_budget=STEP_BUDGET,
                             limit_mm_per_prompt={"image": 2, "video": 0})


@pytest.fixture(scope="module")
def reference(onevision_checkpoint):
    from transformers import LlavaOnevisionForConditionalGeneration

    return anyres.reference(LlavaOnevisionForConditionalGeneration, onevision_checkpoint, CASES)


def _layouts(case: str) -> list[ImageLayout]:
    return [ImageLayout.llava_onevision(size, grid_pinpoints=PINPOINTS, vision_image_size=112)
            for size in CASES[case][0]]


def test_cases_cover_interpolation():
    """The ids say what each case exercises: its grid, and the interpolated map."""
    for case, (sizes, _) in CASES.items():
        for layout in _layouts(case):
            info = layout.anyres
            assert f"{info.grid[0]}x{info.grid[1]}" in case or case == "two-images"
            if "interpolated" in case:
                assert case.endswith(f"to-{info.interpolated[0]}x{info.interpolated[1]}")
            else:
                assert info.interpolated is None


def test_engine_carries_the_checkpoints_layout_rule(engine_results):
    assert engine_results["layout_rule"] == LayoutRule("llava_onevision", 112, 14, PINPOINTS)
    assert engine_results["step_budget"] == STEP_BUDGET


@pytest.mark.parametrize("case", list(CASES))
def test_unpruned_is_vllms_own_model(engine_results, reference, case):
    """Pruning off, FEATHER's class is vLLM's LlavaOnevisionForConditionalGeneration
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


def test_follow_up_turn_reuses_the_pruned_image(engine_results, onevision_checkpoint):
    """Turn 2 of a feather conversation about an interpolated OneVision
    image reuses turn 1's pruned KV and equals the reference with turn 1's
    kept sets forced."""
    from transformers import LlavaOnevisionForConditionalGeneration

    results = engine_results["results"]
    turn1, turn2 = results["feather", FOLLOW_UP_CASE], results["turn2"]
    want = anyres.follow_up_reference(LlavaOnevisionForConditionalGeneration, onevision_checkpoint, CASES,
                                      FOLLOW_UP_CASE, turn1, turn2)
    anyres.check_follow_up(turn1, turn2, want)


# -- through the gateway --------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(onevision_checkpoint):
    """`python -m server --model` on the OneVision checkpoint (vLLM's defaults otherwise)."""
    from tests.helpers import ServerProcess

    proc = ServerProcess(onevision_checkpoint, "--served-model-name", "onevision", max_model_len=2048)
    yield proc
    proc.stop()


@pytest.mark.parametrize("preset", ["none", "feather"])
def test_gateway_serves_onevision_as_the_engine(gateway, onevision_checkpoint, engine_results, preset):
    """The gateway loads FEATHER's OneVision class by --model alone (as it
    does NeXT's: one code path, tested here); its greedy tokens and kept
    sets are the offline engine's, the report maps each region's kept
    tokens in its own raster, the interpolated map's included, and the KV
    demand gauge's model bounds the blocks it held."""
    import httpx

    from tests.helpers import png_data_url

    case = "interpolated-6x2-to-41x13"
    content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}} if image is not None else part
               for part, image in anyres.with_images(CASES, case)]
    body = {"model": "onevision", "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "feather": {"preset": preset, "return_kept": True}}
    r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    want = engine_results["results"][preset, case]
    assert body["choices"][0]["token_ids"] == want["token_ids"]
    if preset == "none":
        assert body["feather"] is None or body["feather"]["stages"] == []
        return
    (image,) = body["feather"]["images"]
    want_kept = [list(per_image[0]) for per_image in (s.per_image for s in want["report"].stages)]
    assert [s["kept_indices"] for s in image["stages"]] == want_kept
    # Per stage: each region's kept count and kept map in its own raster
    # (row * cols + col), and the newline tokens kept (all of them).
    (layout,) = _layouts(case)
    base, tiles = layout.regions
    assert (base.rows, base.cols, tiles.rows, tiles.cols, tiles.newline) == (8, 8, 41, 13, True)
    assert image["image_tokens"] == layout.num_tokens == 64 + 41 * 14
    for stage in image["stages"]:
        kept = stage["kept_indices"]
        regions = {r["name"]: r for r in stage["regions"]}
        assert [(r["rows"], r["cols"]) for r in regions.values()] == [(8, 8), (41, 13)]
        assert regions["base"]["kept_indices"] == [i for i in kept if i < 64]
        assert regions["tiles"]["kept_indices"] == [(i - 64) // 14 * 13 + (i - 64) % 14 for i in kept
                                                    if i >= 64 and (i - 64) % 14 != 13]
        assert stage["newlines_kept"] == 41
        assert stage["kept"] == regions["base"]["kept"] + regions["tiles"]["kept"] + 41
        assert stage["mean_row"] is None and 0 <= regions["tiles"]["mean_row"] <= 1
    _assert_kv_demand_bounds_it(gateway, onevision_checkpoint, body, layout, (900, 300))


def _assert_kv_demand_bounds_it(gateway, checkpoint, answer: dict, layout: ImageLayout,
                                size: tuple[int, int]) -> None:
    """The KV demand gauge's model of this request (server.kv_demand, the
    image laid out from its size as the scheduler lays it out) holds the
    blocks the engine held at the cut's real kept counts, bounds them at
    the stages' upper bounds, and bounds them tighter than all the image's
    tokens would (the gauge's bound where the size is unknown)."""
    import httpx
    from transformers import AutoConfig

    from feather_vllm.pruning import config as pcfg
    from server.kv_demand import KVPool, request_blocks

    hf_config = AutoConfig.from_pretrained(checkpoint)
    num_layers = hf_config.text_config.num_hidden_layers
    total = float(httpx.get(gateway.url + "/metrics").text.split("\nfeather_kv_total_blocks ")[1].split()[0])
    boundaries = pcfg.kv_boundaries(getattr(hf_config, "feather_kv_boundaries", None), num_layers)
    pool = KVPool.build(num_layers, boundaries, 32, int(total) + 1, LayoutRule.of(hf_config))  # CPU block size
    (image,) = pool.images(answer["prompt_token_ids"], hf_config.image_token_index, [size])
    assert image == layout
    report, usage = answer["feather"], answer["usage"]
    held = usage["prompt_tokens"] + usage["completion_tokens"] - 1  # the last token's KV is never written
    kept = [stage["kept"] for stage in report["images"][0]["stages"]]
    config = pcfg.PRESETS["feather"]
    used = report["kv_blocks"]["used"]
    assert request_blocks(pool, config, [image], held, kept=kept) == used
    assert used <= request_blocks(pool, config, [image], held) < request_blocks(pool, config, [image.num_tokens], held)
