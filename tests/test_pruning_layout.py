"""Image-token layouts of the LLaVA family (feather_vllm/pruning/layout.py):
token counts and order against vLLM 0.32 and transformers, FEATHER's stage
on regions, bounds and per-region reports (docs/llava_family_layouts.md)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from feather_vllm.pruning.config import PRESETS, PruningConfig, Stage
from feather_vllm.pruning.cost import kept_per_stage_bounds, kept_per_stage_max
from feather_vllm.pruning.layout import (
    NEWLINE,
    ImageLayout,
    LayoutRule,
    LayoutStageBound,
    Region,
    layout_kept_per_stage_bounds,
    layout_kept_per_stage_max,
    region_kept_counts,
    region_kept_indices,
    region_kept_maps,
    region_stats,
    select_best_resolution,
    select_stage_layout,
)
from feather_vllm.pruning.selection import select_stage, uniform_grid

# (height, width): NeXT tokens, NeXT tile map (rows, cols), OneVision tokens,
# OneVision tile map (rows, cols), values from vLLM 0.32's processor info.
SIZES = [
    pytest.param((336, 336), 1176, (24, 24), 1485, (27, 27), id="h336_w336"),
    pytest.param((672, 672), 2928, (48, 48), 3699, (54, 54), id="h672_w672"),
    pytest.param((336, 1008), 2328, (24, 72), 2943, (27, 81), id="h336_w1008"),
    pytest.param((1008, 336), 2376, (72, 24), 2997, (81, 27), id="h1008_w336"),
    pytest.param((500, 300), 1576, (40, 24), 2017, (46, 27), id="h500_w300"),
    pytest.param((300, 500), 1560, (24, 40), 1998, (27, 46), id="h300_w500"),
    pytest.param((1920, 1080), 1968, (48, 28), 7317, (108, 60), id="h1920_w1080"),
    pytest.param((1080, 1920), 1948, (28, 48), 7269, (60, 108), id="h1080_w1920"),
    pytest.param((944, 1153), 2536, (40, 48), 8748, (81, 98), id="h944_w1153-ov-largest"),
    pytest.param((2000, 2000), 2928, (48, 48), 7371, (81, 81), id="h2000_w2000"),
    pytest.param((10, 1000), 576, (0, 72), 811, (1, 81), id="h10_w1000-no-tile-rows"),
    pytest.param((1000, 10), 648, (72, 0), 891, (81, 1), id="h1000_w10-newlines-only"),
]


# -- layouts: counts ------------------------------------------------------------

@pytest.mark.parametrize("size, next_tokens, next_map, ov_tokens, ov_map", SIZES)
def test_token_counts_and_regions(size, next_tokens, next_map, ov_tokens, ov_map):
    for layout, tokens, (rows, cols), side in ((ImageLayout.llava_next(size), next_tokens, next_map, 24),
                                               (ImageLayout.llava_onevision(size), ov_tokens, ov_map, 27)):
        base, tiles = layout.regions
        assert (base.name, base.offset, base.rows, base.cols, base.newline) == ("base", 0, side, side, False)
        assert (tiles.name, tiles.offset, tiles.rows, tiles.cols, tiles.newline) == ("tiles", side * side,
                                                                                    rows, cols, True)
        assert layout.num_tokens == tokens == side * side + rows * cols + rows
        assert layout.num_newlines == rows and layout.num_image_tokens == tokens - rows
        assert not layout.is_square


@pytest.mark.parametrize("size", [(336, 336), (672, 672), (336, 1008), (1008, 336), (500, 300), (300, 500),
                                  (1920, 1080), (1080, 1920), (944, 1153), (2000, 2000), (10, 1000),
                                  (1000, 10), (333, 777), (1234, 567), (384, 384), (2304, 2304)],
                         ids=lambda s: f"h{s[0]}_w{s[1]}")
def test_counts_match_vllm_processor_info(vllm_models, size):
    """vLLM's placeholder count (processing info, the prompt's image run)."""
    h, w = size
    assert ImageLayout.llava_next(size).num_tokens == vllm_models.next_info.get_num_image_tokens(
        image_width=w, image_height=h)
    assert ImageLayout.llava_onevision(size).num_tokens == vllm_models.ov_info.get_num_image_tokens(
        image_width=w, image_height=h)


def test_select_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    from feather_vllm.pruning.layout import LLAVA_NEXT_PINPOINTS, LLAVA_ONEVISION_PINPOINTS

    sizes = [(h, w) for h in (1, 10, 100, 300, 336, 384, 500, 672, 1000, 1080, 2000, 4000)
             for w in (1, 10, 100, 300, 336, 384, 500, 672, 1000, 1920, 2000, 4000)]
    for pinpoints in (LLAVA_NEXT_PINPOINTS, LLAVA_ONEVISION_PINPOINTS):
        as_lists = [list(p) for p in pinpoints]
        for size in sizes:
            assert select_best_resolution(size, pinpoints) == tuple(hf_select(size, as_lists)), size


def test_hf_config_defaults_are_the_layout_defaults():
    from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig

    from feather_vllm.pruning.layout import LLAVA_NEXT_PINPOINTS, LLAVA_ONEVISION_PINPOINTS

    assert [tuple(p) for p in LlavaNextConfig().image_grid_pinpoints] == list(LLAVA_NEXT_PINPOINTS)
    assert [tuple(p) for p in LlavaOnevisionConfig().image_grid_pinpoints] == list(LLAVA_ONEVISION_PINPOINTS)
    for size in ((500, 300), (1920, 1080)):
        assert ImageLayout.for_hf_config(LlavaNextConfig(), size) == ImageLayout.llava_next(size)
        assert ImageLayout.for_hf_config(LlavaOnevisionConfig(), size) == ImageLayout.llava_onevision(size)
    assert ImageLayout.for_hf_config(LlavaConfig(), (500, 300)) == ImageLayout.square(24)
    with pytest.raises(ValueError, match="no image-token layout"):
        ImageLayout.for_hf_config(types.SimpleNamespace(model_type="qwen2_vl", vision_config=None), (1, 1))


# -- layouts: token order against the models' merge code -------------------------
#
# Each token's embedding carries where it came from: [is_base, row, col,
# is_newline], row/col in the base raster or in the stitched (padded) tile
# map. The models' merge then shows where every token went.

def _tagged_patches(side: int, grid: tuple[int, int]) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    base = torch.stack([torch.ones(side * side), rows.flatten().float(), cols.flatten().float(),
                        torch.zeros(side * side)], dim=-1)
    tiles = []
    for ti in range(grid[0]):
        for tj in range(grid[1]):
            tiles.append(torch.stack([torch.zeros(side * side), (rows + ti * side).flatten().float(),
                                      (cols + tj * side).flatten().float(), torch.zeros(side * side)], dim=-1))
    return torch.stack([base, *tiles])


NEWLINE_VEC = torch.tensor([0.0, 0.0, 0.0, 1.0])


def _check_merged(merged: torch.Tensor, layout: ImageLayout) -> None:
    assert merged.shape == (layout.num_tokens, 4)
    base, tiles = layout.regions
    is_newline = merged[:, 3] == 1
    assert is_newline.nonzero().flatten().tolist() == layout.newline_indices().tolist()
    assert layout.newline_mask().tolist() == is_newline.tolist()
    side = base.rows
    b = merged[base.indices()]
    assert (b[..., 0] == 1).all()
    assert torch.equal(b[..., 1], torch.arange(side).float().unsqueeze(1).expand(side, side))
    assert torch.equal(b[..., 2], torch.arange(side).float().unsqueeze(0).expand(side, side))
    t = merged[tiles.indices()]  # [rows, cols, 4] in the region's own raster
    assert (t[..., 0] == 0).all() and (t[..., 3] == 0).all()
    info = layout.anyres
    if info.interpolated is None:  # an exact crop of the stitched map
        top, left = info.crop_offset
        assert torch.equal(t[..., 1], (top + torch.arange(tiles.rows)).float().unsqueeze(1).expand_as(t[..., 1]))
        assert torch.equal(t[..., 2], (left + torch.arange(tiles.cols)).float().unsqueeze(0).expand_as(t[..., 2]))
    else:  # bilinear: rows stay rows, columns stay columns, in order
        row_tag, col_tag = t[..., 1], t[..., 2]
        assert torch.allclose(row_tag, row_tag[:, :1].expand_as(row_tag), atol=1e-4)
        assert torch.allclose(col_tag, col_tag[:1, :].expand_as(col_tag), atol=1e-4)
        assert (row_tag[1:, 0] > row_tag[:-1, 0]).all() and (col_tag[0, 1:] > col_tag[0, :-1]).all()


@pytest.mark.parametrize("size", [s.values[0] for s in SIZES], ids=[s.id for s in SIZES])
def test_order_matches_vllm_merge(vllm_models, size):
    for layout, cls, cfg, kwargs in (
            (ImageLayout.llava_next(size), vllm_models.Next, vllm_models.next_cfg, {}),
            (ImageLayout.llava_onevision(size), vllm_models.Onevision, vllm_models.ov_cfg,
             {"image_newline": NEWLINE_VEC})):
        fake = types.SimpleNamespace(config=cfg, image_newline=NEWLINE_VEC)
        patches = _tagged_patches(layout.regions[0].rows, layout.anyres.grid)
        merged = cls._merge_image_patch_embeddings(fake, torch.tensor(size), patches,
                                                   strategy="spatial_unpad", **kwargs)
        _check_merged(merged, layout)


@pytest.mark.parametrize("size", [s.values[0] for s in SIZES], ids=[s.id for s in SIZES])
def test_order_matches_transformers_pack(size):
    from transformers import LlavaNextConfig, LlavaOnevisionConfig
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    layout = ImageLayout.llava_next(size)
    fake = types.SimpleNamespace(config=LlavaNextConfig())
    (merged,), _ = LlavaNextModel.pack_image_features(
        fake, [_tagged_patches(24, layout.anyres.grid)], torch.tensor([size]), "default", NEWLINE_VEC)
    _check_merged(merged, layout)
    layout = ImageLayout.llava_onevision(size)
    fake = types.SimpleNamespace(config=LlavaOnevisionConfig())
    (merged,), _ = LlavaOnevisionModel.pack_image_features(
        fake, [_tagged_patches(27, layout.anyres.grid)], torch.tensor([size]), NEWLINE_VEC)
    _check_merged(merged, layout)


def test_worked_example_next_672():
    """docs/llava_family_layouts.md: 576 + 48 x 48 + 48 = 2,928 tokens."""
    layout = ImageLayout.llava_next((672, 672))
    assert layout.num_tokens == 2928
    assert layout.anyres.grid == (2, 2) and layout.anyres.crop_offset == (0, 0)
    nl = layout.newline_indices()
    assert nl[:3].tolist() == [624, 673, 722] and nl[-1].item() == 2927 and nl.numel() == 48
    assert layout.newline_rows()[:2] == [(624, "tiles", 0), (673, "tiles", 1)]
    assert layout.locate(0) == ("base", 0, 0) and layout.locate(575) == ("base", 23, 23)
    assert layout.locate(576) == ("tiles", 0, 0) and layout.locate(623) == ("tiles", 0, 47)
    assert layout.locate(624) == ("tiles", 0, None) and layout.locate(625) == ("tiles", 1, 0)
    assert layout.locate(2926) == ("tiles", 47, 47) and layout.locate(2927) == ("tiles", 47, None)
    assert layout.grid_size(3) == 64 + 256 and layout.grid(3).numel() == 320
    assert layout.grid(3)[64:68].tolist() == [576, 579, 582, 585]  # tiles row 0, cols 0, 3, 6, 9
    assert layout.grid(3)[80].item() == 576 + 3 * 49  # tiles row 3, col 0


def test_onevision_interpolates_above_nine_tiles():
    # 2000 x 2000: 6 x 6 tiles = 162 x 162 tokens, ratio 2 -> 81 x 81.
    info = ImageLayout.llava_onevision((2000, 2000)).anyres
    assert (info.grid, info.unpadded, info.interpolated) == ((6, 6), (162, 162), (81, 81))
    # 944 x 1153: 81 x 98, ratio 1.0999 <= 1.1 -> kept as is (vLLM's largest image).
    info = ImageLayout.llava_onevision((944, 1153)).anyres
    assert (info.grid, info.crop_offset, info.unpadded, info.interpolated) == ((3, 4), (0, 5), (81, 98), None)


def test_square_and_custom_layouts():
    sq = ImageLayout.square(24)
    assert sq.num_tokens == 576 and sq.is_square and sq.num_newlines == 0
    assert sq.grid(3).tolist() == uniform_grid(576, 3).tolist()
    with pytest.raises(ValueError, match="without gaps"):
        ImageLayout((Region("a", 0, 2, 2), Region("b", 5, 2, 2)))
    with pytest.raises(ValueError, match="repeated or reserved"):
        ImageLayout.from_rasters(("a", 1, 1, False), ("a", 1, 1, False))
    with pytest.raises(ValueError, match="repeated or reserved"):
        ImageLayout.from_rasters((NEWLINE, 1, 1, False))
    with pytest.raises(IndexError):
        sq.locate(576)


# -- selection ------------------------------------------------------------------

SMALL = ImageLayout.from_rasters(("base", 3, 3, False), ("tiles", 2, 4, True))
# run:  base 0..8 (3 x 3) | tiles row 0: 9 10 11 12, newline 13 | row 1: 14 15 16 17, newline 18


def test_small_layout_by_hand():
    assert SMALL.num_tokens == 19 and SMALL.num_image_tokens == 17
    assert SMALL.newline_indices().tolist() == [13, 18]
    assert SMALL.grid(2).tolist() == [0, 2, 6, 8, 9, 11]


def _small_scores() -> torch.Tensor:
    scores = torch.zeros(19)
    scores[[4, 10, 15, 17]] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    scores[[13, 18]] = 100.0  # newline scores are ignored, however high
    return scores


@pytest.mark.parametrize("stage, expected, counts", [
    pytest.param(Stage(1, 0.25, "rope_free", 2), [0, 2, 4, 6, 8, 9, 10, 11, 13, 15, 17, 18],
                 {"base": 5, "tiles": 5, NEWLINE: 2}, id="top4-grid2-newlines"),
    pytest.param(Stage(1, 0.25, "rope_free"), [4, 10, 13, 15, 17, 18],
                 {"base": 1, "tiles": 3, NEWLINE: 2}, id="top4-newlines"),
    pytest.param(Stage(1, 0.1, "rope"), [4, 13, 18], {"base": 1, "tiles": 0, NEWLINE: 2}, id="top1-newlines"),
    pytest.param(Stage(1, 0.1, "rope", 3), [0, 4, 9, 12, 13, 18],
                 {"base": 2, "tiles": 2, NEWLINE: 2}, id="top1-grid3"),
])
def test_select_small_layout(stage, expected, counts):
    kept = select_stage_layout(_small_scores(), torch.arange(19), stage, SMALL)
    assert kept.tolist() == expected
    assert region_kept_counts(kept, SMALL) == counts


def test_select_small_layout_two_stages_and_maps():
    stage1, stage2 = Stage(1, 0.25, "rope_free", 2), Stage(2, 0.5, "rope_free")
    n1 = select_stage_layout(_small_scores(), torch.arange(19), stage1, SMALL)
    # Stage 2 ranks the 10 present raster tokens (k = 5); the 2 newlines stay.
    scores2 = torch.tensor([9.0, 1, 8, 1, 7, 6, 1, 1, 100, 5, 1, 100])  # aligned with n1
    n2 = select_stage_layout(scores2, n1, stage2, SMALL)
    assert n1.tolist() == [0, 2, 4, 6, 8, 9, 10, 11, 13, 15, 17, 18]
    assert n2.tolist() == [0, 4, 8, 9, 13, 15, 18]
    assert region_kept_counts(n2, SMALL) == {"base": 3, "tiles": 2, NEWLINE: 2}
    maps = region_kept_maps(n2, SMALL)
    assert maps["base"].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert maps["tiles"].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert region_kept_indices(n2, SMALL) == {"base": [0, 4, 8], "tiles": [0, 5]}
    assert layout_kept_per_stage_bounds(PruningConfig((stage1, stage2)), SMALL) == [
        LayoutStageBound(4, 10, 2), LayoutStageBound(2, 5, 2)]
    assert layout_kept_per_stage_max(PruningConfig((stage1, stage2)), SMALL) == [12, 7]


def test_newline_rule_follows_presence():
    """A newline is kept whenever it is present, whatever its score; one
    that is not present (a caller that dropped it) does not come back."""
    scores = torch.full((19,), -math.inf)
    scores[:9] = 1.0
    kept = select_stage_layout(scores, torch.arange(19), Stage(1, 0.5), SMALL)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 13, 18]  # top-8 of 17: ties by position
    # Present: raster 0, 4, 9, 14 and newline 13 (18 was dropped). Top-1 of
    # the 4 raster tokens is 14; the stride-2 grid still present is 0 and 9.
    present = torch.tensor([0, 4, 9, 13, 14])
    kept = select_stage_layout(torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0]), present, Stage(1, 0.25, grid_stride=2),
                               SMALL)
    assert kept.tolist() == [0, 9, 13, 14]


@pytest.mark.parametrize("side", [24, 27, 7], ids=["llava15-24", "paper-27", "small-7"])
@pytest.mark.parametrize("preset", ["fastv", "feather", "pyramiddrop"])
@pytest.mark.parametrize("seed", range(3))
def test_square_layout_equals_select_stage(side, preset, seed):
    gen = torch.Generator().manual_seed(seed)
    layout, n = ImageLayout.square(side), side * side
    present_old = present_new = torch.arange(n)
    for stage in PRESETS[preset].stages:
        scores = torch.rand(present_old.numel(), generator=gen)
        if seed == 2:  # many ties
            scores = (scores * 4).floor()
        present_old = select_stage(scores, present_old, stage, n)
        present_new = select_stage_layout(scores, present_new, stage, layout)
        assert present_new.tolist() == present_old.tolist()
    assert layout_kept_per_stage_max(PRESETS[preset], layout) == kept_per_stage_max(PRESETS[preset], n)
    assert [(b.lo, b.hi) for b in layout_kept_per_stage_bounds(PRESETS[preset], layout)] == \
        kept_per_stage_bounds(PRESETS[preset], n)


@pytest.mark.parametrize("preset", ["fastv", "feather", "pyramiddrop"])
@pytest.mark.parametrize("seed", range(4))
def test_keeping_an_earlier_selection_stays_within_the_bounds(preset, seed):
    """keep_both: each stage keeps its own selection and an earlier turn's
    kept tokens (a chain of nested sets), which also enter the next stage;
    the stage bounds with `also` (the KV reservation) cover every stage."""
    gen = torch.Generator().manual_seed(seed)
    config, layout = PRESETS[preset], ImageLayout.square(24)
    earlier, present = [], torch.arange(576)
    for stage in config.stages:  # the earlier turn's own cut, on other scores
        present = select_stage_layout(torch.rand(present.numel(), generator=gen), present, stage, layout)
        earlier.append(present)
    bounds = layout_kept_per_stage_bounds(config, layout, [e.numel() for e in earlier])
    present = torch.arange(576)
    for stage, theirs, bound in zip(config.stages, earlier, bounds):
        mine = select_stage_layout(torch.rand(present.numel(), generator=gen), present, stage, layout)
        present = torch.unique(torch.cat([mine, theirs]))
        assert bound.lo <= present.numel() <= bound.hi
    assert bounds[0].hi > layout_kept_per_stage_bounds(config, layout)[0].hi


def test_square_layout_unsorted_survivors_equal_select_stage():
    gen = torch.Generator().manual_seed(5)
    survivors = torch.randperm(576, generator=gen)[:300]
    scores = (torch.rand(300, generator=gen) * 3).floor()
    stage = Stage(8, 0.3, "rope_free", 3)
    assert select_stage_layout(scores, survivors, stage, ImageLayout.square(24)).tolist() == \
        select_stage(scores, survivors, stage, 576).tolist()


@pytest.mark.parametrize("model", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", [s.values[0] for s in SIZES], ids=[s.id for s in SIZES])
def test_feather_on_anyres_layouts_within_bounds(model, size):
    layout = getattr(ImageLayout, model)(size)
    stage1, stage2 = PRESETS["feather"].stages
    gen = torch.Generator().manual_seed(0)
    n1 = select_stage_layout(torch.rand(layout.num_tokens, generator=gen), torch.arange(layout.num_tokens),
                             stage1, layout)
    counts1 = region_kept_counts(n1, layout)
    grid = set(layout.grid(3).tolist())
    assert grid <= set(n1.tolist())  # every region's grid is kept
    assert set(layout.newline_indices().tolist()) <= set(n1.tolist())
    assert counts1[NEWLINE] == layout.num_newlines
    assert sum(counts1.values()) == n1.numel()
    n2 = select_stage_layout(torch.rand(n1.numel(), generator=gen), n1, stage2, layout)
    assert region_kept_counts(n2, layout)[NEWLINE] == layout.num_newlines
    raster1 = n1.numel() - layout.num_newlines
    assert n2.numel() - layout.num_newlines == max(1, int(raster1 * 0.09))
    (b1, b2) = layout_kept_per_stage_bounds(PRESETS["feather"], layout)
    assert b1.lo <= n1.numel() <= b1.hi and b2.lo <= n2.numel() <= b2.hi


# feather stage 1: top int(0.3 * raster) + per-region grid (stride 3), stage 2:
# int(0.09 * stage-1 raster); plus every newline. E.g. NeXT 336 x 336: raster
# 576 + 24 x 24 = 1152, k = 345, grid 64 + 64 -> at most 473, then 31..42.
# OneVision 944 x 1153: raster 729 + 81 x 98 = 8667, k = 2600, grid
# 81 + 27 x 33 = 972 -> at most 3572, then 234..321.
@pytest.mark.parametrize("model, size, bounds", [
    pytest.param("llava_next", (672, 672), [(864, 1184, 48), (77, 106, 48)], id="next-h672_w672"),
    pytest.param("llava_next", (336, 336), [(345, 473, 24), (31, 42, 24)], id="next-h336_w336"),
    pytest.param("llava_next", (10, 1000), [(172, 236, 0), (15, 21, 0)], id="next-base-only"),
    pytest.param("llava_onevision", (2000, 2000), [(2187, 2997, 81), (196, 269, 81)], id="ov-h2000_w2000"),
    pytest.param("llava_onevision", (944, 1153), [(2600, 3572, 81), (234, 321, 81)], id="ov-h944_w1153"),
])
def test_feather_bounds_on_anyres(model, size, bounds):
    layout = getattr(ImageLayout, model)(size)
    got = layout_kept_per_stage_bounds(PRESETS["feather"], layout)
    assert [tuple(b) for b in got] == bounds
    assert layout_kept_per_stage_max(PRESETS["feather"], layout) == [b.hi for b in got]


def test_selection_errors():
    with pytest.raises(ValueError, match="scores for"):
        select_stage_layout(torch.rand(3), torch.arange(4), Stage(1, 0.5), SMALL)
    with pytest.raises(ValueError, match=r"\[0, 19\)"):
        select_stage_layout(torch.rand(2), torch.tensor([0, 19]), Stage(1, 0.5), SMALL)
    with pytest.raises(ValueError, match=r"\[0, 19\)"):
        region_kept_counts([19], SMALL)


# -- reports ----------------------------------------------------------------------

def test_region_stats_per_region():
    stats = region_stats([0, 2, 4, 6, 8, 9, 10, 11, 13, 15, 17, 18], SMALL)
    assert stats["base"]["kept"] == 5 and stats["base"]["mean_row"] == pytest.approx(0.5)
    # tiles 2 x 4: row 0 keeps cols 0, 1, 2; row 1 keeps cols 1, 3
    assert stats["tiles"]["kept"] == 5 and stats["tiles"]["mean_row"] == pytest.approx(2 / 5)
    assert stats["tiles"]["top_left"] == 1.0 and stats["tiles"]["top_right"] == 0.5
    assert stats["tiles"]["bottom_left"] == 0.5 and stats["tiles"]["bottom_right"] == 0.5
    empty = region_stats([13], SMALL)["tiles"]
    assert empty["kept"] == 0 and math.isnan(empty["mean_row"])


def test_layout_module_imports_no_vllm_or_transformers():
    import subprocess
    import sys

    code = ("import sys, feather_vllm.pruning.layout; "
            "sys.exit(any(m.split('.')[0] in ('vllm', 'transformers') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- vLLM's own code, without an engine --------------------------------------------

@pytest.fixture(scope="module")
def vllm_models():
    from feather_vllm.compat import shim_pixtral_image_processor

    shim_pixtral_image_processor()
    from transformers import LlavaNextConfig, LlavaOnevisionConfig
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration, LlavaNextProcessingInfo
    from vllm.model_executor.models.llava_onevision import (
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessingInfo,
    )

    class Ctx:  # what the processing info reads of vLLM's InputProcessingContext
        def __init__(self, config):
            self.config = config

        def get_hf_config(self, *args, **kwargs):
            return self.config

    next_cfg, ov_cfg = LlavaNextConfig(), LlavaOnevisionConfig()
    return types.SimpleNamespace(
        next_cfg=next_cfg, ov_cfg=ov_cfg,
        next_info=LlavaNextProcessingInfo(Ctx(next_cfg)), ov_info=LlavaOnevisionProcessingInfo(Ctx(ov_cfg)),
        Next=LlavaNextForConditionalGeneration, Onevision=LlavaOnevisionForConditionalGeneration)


def test_most_tokens_of_one_image_per_model():
    """The largest image's token count (what one step must hold to prune
    it): LLaVA-1.5's raster, NeXT's 672 x 672 image; OneVision's bound
    holds every image of a scan of sizes and is within 1% of the scan's
    largest."""
    from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig

    assert LayoutRule.of(LlavaConfig()).most_tokens() == 576
    assert LayoutRule.of(LlavaNextConfig()).most_tokens() == 2928 == ImageLayout.llava_next((672, 672)).num_tokens
    rule = LayoutRule.of(LlavaOnevisionConfig())
    scanned = max(rule.layout((h, w)).num_tokens for h in range(10, 2400, 47) for w in range(10, 2400, 47))
    assert scanned <= rule.most_tokens() <= scanned * 1.01
