"""The pure algorithm (no engine): settings, criterion, selection, cost model,
against the spec's numbers."""

from __future__ import annotations

import math

import pytest
import torch

from feather_vllm.pruning import config as pcfg
from feather_vllm.pruning.config import PRESETS, PruningConfigError, Stage
from feather_vllm.pruning.cost import (
    flops_ratio,
    kept_per_stage_bounds,
    kept_per_stage_max,
    kv_ratio,
    layer_token_counts,
)
from feather_vllm.pruning.layout import ImageLayout, LayoutRule, region_stats
from feather_vllm.pruning.schedule import FallbackReason, chunk_end, decide
from feather_vllm.pruning.scoring import last_token_image_attention
from feather_vllm.pruning.selection import NonSquareGridError, select_stage, uniform_grid

PAPER_TOKENS = 729  # 27 x 27, Prismatic SigLIP 384px


# -- settings ------------------------------------------------------------------

def test_presets_are_the_papers():
    assert PRESETS["none"].stages == ()
    assert PRESETS["fastv"].stages == (Stage(3, 0.25, "rope"),)
    assert PRESETS["feather"].stages == (Stage(8, 0.30, "rope_free", 3), Stage(16, 0.09, "rope_free"))
    assert PRESETS["pyramiddrop"].stages == (Stage(8, 0.5, "rope"), Stage(16, 0.5, "rope"), Stage(24, 0.5, "rope"))
    for preset in PRESETS.values():
        preset.validate(32)


@pytest.mark.parametrize("spec, field", [
    ({"stages": [{"layer": 32, "keep": 0.5}]}, "stages[0].layer"),
    ({"stages": [{"layer": 0, "keep": 0.5}]}, "stages[0].layer"),
    ({"stages": [{"layer": 4, "keep": 0.0}]}, "stages[0].keep"),
    ({"stages": [{"layer": 4, "keep": 1.5}]}, "stages[0].keep"),
    ({"stages": [{"layer": 4, "keep": "half"}]}, "stages[0].keep"),
    ({"stages": [{"layer": 8, "keep": 0.5}, {"layer": 8, "keep": 0.5}]}, "stages[1].layer"),
    ({"stages": [{"layer": 8, "keep": 0.5}, {"layer": 4, "keep": 0.5}]}, "stages[1].layer"),
    ({"stages": [{"layer": 4, "keep": 0.5, "criterion": "cosine"}]}, "stages[0].criterion"),
    ({"stages": [{"layer": 4, "keep": 0.5, "grid_stride": 0}]}, "stages[0].grid_stride"),
    ({"stages": [{"layer": 4}]}, "stages[0].keep"),
    ({"stages": [{"layer": 4, "keep": 0.5, "ratio": 1}]}, "stages[0]"),
    ({"stages": "fastv"}, "stages"),
    ({"preset": "fastest"}, "preset"),
    ({"preset": 3}, "preset"),
    ({"mode": "fast"}, "feather"),
    ({"preset": "feather", "follow_up": "both"}, "follow_up"),
    ({"preset": "feather", "reselect": "yes"}, "reselect"),
    ({"preset": "feather", "reselect": True, "follow_up": "keep_both"}, "reselect"),
    ({"preset": "fastv", "add_back": 0}, "add_back"),
    ({"preset": "fastv", "add_back": 1.5}, "add_back"),
    ({"preset": "fastv", "add_back": "some"}, "add_back"),
    ({"preset": "feather", "add_back": 0.1}, "add_back"),  # feather reuses: nothing to add back
    ("fastest", "preset"),
    (7, "feather"),
])
def test_invalid_settings_name_the_field(spec, field):
    with pytest.raises(PruningConfigError) as err:
        pcfg.resolve(spec).validate(32)
    assert err.value.field == field


def test_explicit_stages_and_defaults():
    cfg = pcfg.resolve({"preset": "mine", "stages": [{"layer": 5, "keep": 0.4, "criterion": "rope"}]})
    assert cfg.name == "mine" and cfg.cut_layers == (5,)
    assert pcfg.resolve(None) is PRESETS["none"]
    assert pcfg.resolve(None, PRESETS["feather"]) is PRESETS["feather"]
    assert pcfg.resolve({"preset": "fastv"}) is PRESETS["fastv"]
    assert pcfg.resolve(PRESETS["feather"].to_dict()) == PRESETS["feather"]


@pytest.mark.parametrize("spec, count", [
    ({"preset": "fastv"}, 144),
    ({"preset": "pyramiddrop", "follow_up": "add_back"}, 288),
    ({"preset": "fastv", "add_back": 0.05}, 28),
    ({"preset": "fastv", "add_back": 0.0001}, 1),
], ids=["fastv-first-keep", "pyramiddrop-first-keep", "share", "at-least-one"])
def test_add_back_count(spec, count):
    """An add_back follow-up adds back, to a 576-token image, its `add_back`
    share, else the first stage's keep share (at least one token)."""
    assert pcfg.resolve(spec).add_back_count(576) == count


@pytest.mark.parametrize("spec, follow_up", [
    ({"preset": "feather"}, "reuse"),
    ({"preset": "fastv"}, "add_back"),
    ({"preset": "pyramiddrop"}, "keep_both"),
    ({"stages": [{"layer": 3, "keep": 0.25}]}, "keep_both"),
    ({"preset": "fastv", "follow_up": "reuse"}, "reuse"),
    ({"preset": "feather", "follow_up": "keep_both"}, "keep_both"),
    ({"preset": "pyramiddrop", "follow_up": "add_back"}, "add_back"),
    ({"preset": "feather", "reselect": True}, "reselect"),
    ({"preset": "feather", "reselect": True, "follow_up": "reselect"}, "reselect"),
    ({"preset": "feather", "reselect": False}, "reuse"),
], ids=["feather", "fastv", "pyramiddrop", "stages", "reuse", "keep_both", "add_back", "reselect",
        "both-spellings", "reselect-false"])
def test_follow_up_policy(spec, follow_up):
    """The request's follow-up policy, else its preset's (feather reuses,
    fastv adds back, pyramiddrop keeps both); explicit stages keep both;
    `"reselect": true` spells "reselect"."""
    assert pcfg.resolve(spec).follow_up == follow_up


# -- criterion -----------------------------------------------------------------

def test_last_token_attention_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # 2 heads, dim 2
    k = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])  # 2 tokens, 2 kv heads
    scores = last_token_image_attention(q, k, scale=1.0)
    e = math.e
    head0 = torch.tensor([e / (e + 1), 1 / (e + 1)])
    head1 = torch.tensor([1 / (1 + e), e / (1 + e)])
    assert torch.allclose(scores, (head0 + head1) / 2)
    assert torch.isclose(scores.sum(), torch.tensor(1.0))


def test_gqa_heads_expand_like_an_explicit_loop():
    torch.manual_seed(0)
    num_heads, num_kv, d, n = 8, 2, 16, 30
    q, k = torch.randn(num_heads, d), torch.randn(n, num_kv, d)
    per_head = [torch.softmax(k[:, h // (num_heads // num_kv)] @ q[h] * 0.25, dim=0) for h in range(num_heads)]
    assert torch.allclose(last_token_image_attention(q, k, 0.25), torch.stack(per_head).mean(0), atol=1e-6)


# -- selection -----------------------------------------------------------------

def test_uniform_grids():
    assert uniform_grid(576, 3).numel() == 64  # LLaVA-1.5: 24 x 24
    assert uniform_grid(PAPER_TOKENS, 3).tolist() == torch.arange(729).reshape(27, 27)[::3, ::3].flatten().tolist()
    assert uniform_grid(PAPER_TOKENS, 3).numel() == 81
    with pytest.raises(NonSquareGridError, match="not a square"):
        uniform_grid(600, 3)


def test_fastv_keeps_182_of_729_by_score():
    torch.manual_seed(1)
    scores = torch.rand(PAPER_TOKENS)
    kept = select_stage(scores, torch.arange(PAPER_TOKENS), PRESETS["fastv"].stages[0], PAPER_TOKENS)
    assert kept.numel() == 182
    assert set(kept.tolist()) == set(torch.topk(scores, 182).indices.tolist())
    assert kept.tolist() == sorted(kept.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_feather_stage1_is_top218_union_grid_then_9_percent(seed):
    torch.manual_seed(seed)
    stage1, stage2 = PRESETS["feather"].stages
    scores = torch.rand(PAPER_TOKENS)
    n1 = select_stage(scores, torch.arange(PAPER_TOKENS), stage1, PAPER_TOKENS)
    expected = set(torch.topk(scores, 218).indices.tolist()) | set(uniform_grid(PAPER_TOKENS, 3).tolist())
    assert n1.tolist() == sorted(expected)
    assert 218 <= n1.numel() <= 299
    scores2 = torch.rand(n1.numel())
    n2 = select_stage(scores2, n1, stage2, PAPER_TOKENS)
    assert n2.numel() == int(n1.numel() * 0.09)
    assert set(n2.tolist()) == set(n1[torch.topk(scores2, n2.numel()).indices].tolist())


def test_ties_rank_lower_index_first():
    kept = select_stage(torch.ones(16), torch.arange(16), Stage(3, 0.25, "rope"), 16)
    assert kept.tolist() == [0, 1, 2, 3]


# -- when a step can prune --------------------------------------------------------

@pytest.mark.parametrize("computed,scheduled,prompt_len,ranges,reason", [
    (0, 600, 600, [(5, 576)], None),
    (5, 595, 600, [(5, 576)], None),  # text before the image came from the cache
    (0, 300, 600, [(5, 576)], FallbackReason.PROMPT_SPLIT),
    (6, 594, 600, [(5, 576)], FallbackReason.IMAGE_ALREADY_COMPUTED),
    (0, 600, 600, [(5, 575)], FallbackReason.UNKNOWN_LAYOUT),
    (0, 1200, 1200, [(5, 576), (600, 576)], None),
    (0, 1200, 1200, [(5, 576), (600, 575)], FallbackReason.UNKNOWN_LAYOUT),
    (0, 1000, 1200, [(5, 576), (600, 576)], FallbackReason.PROMPT_SPLIT),
    (0, 581, 581, [(5, 576)], FallbackReason.NO_TEXT_AFTER_IMAGE),
    (0, 1176, 1176, [(5, 576), (600, 576)], FallbackReason.NO_TEXT_AFTER_IMAGE),
], ids=["whole-prompt", "text-prefix-cached", "split", "image-computed", "non-square", "two-images",
        "second-image-non-square", "split-between-images", "image-last", "second-image-last"])
def test_prune_decision(computed, scheduled, prompt_len, ranges, reason):
    # LLaVA-1.5's rule: a run of 576 tokens is its 24 x 24 raster; any other count has no layout.
    rule = LayoutRule("llava", 336, 14)
    decision = decide(computed, scheduled, prompt_len, ranges, [rule.layout(None, n) for _, n in ranges])
    assert decision.prune == (reason is None) and decision.reason == reason


@pytest.mark.parametrize("computed,offered,expected", [
    (0, 600, 600),  # the whole prompt fits
    (0, 300, 5),  # would end inside the image: ends before it
    (0, 3, 3),  # ends before the image anyway
    (5, 300, 0),  # at the image with too little room: waits for a step with room
    (0, 597, 5),  # would end before the last prompt token
    (6, 100, 100),  # image already computed (nothing to protect)
], ids=["fits", "inside-image", "before-image", "waits", "before-last-token", "image-computed"])
def test_chunk_ends_before_the_image(computed, offered, expected):
    assert chunk_end(computed, offered, 600, first_image=5, max_chunk=2048) == expected


def test_chunk_too_small_for_image_and_tail_splits():
    """595 tokens from the image on never fit a 512-token step: the offer
    stands (the request then runs unpruned, PROMPT_SPLIT)."""
    assert chunk_end(0, 512, 600, first_image=5, max_chunk=512) == 512


def test_text_only_is_no_fallback():
    decision = decide(0, 20, 20, [], [])
    assert not decision.prune and decision.reason is None and not decision.fallback


# -- cost model ------------------------------------------------------------------

def test_kept_bounds_for_the_papers_layout():
    assert kept_per_stage_bounds(PRESETS["fastv"], PAPER_TOKENS) == [(182, 182)]
    assert kept_per_stage_bounds(PRESETS["feather"], PAPER_TOKENS) == [(218, 299), (19, 26)]
    assert kept_per_stage_max(PRESETS["pyramiddrop"], PAPER_TOKENS) == [364, 182, 91]
    assert kept_per_stage_max(PRESETS["feather"], 576) == [236, 21]


def test_paper_flops_and_kv_reductions():
    """d=4096, m=11008, 32 layers, 729 image tokens, BOS + 16 prompt tokens.

    Cuts this gives: FastV 67.1% (paper 68), FEATHER 62.3% at N1 = 287 and
    61.9% at its bound N1 = 299 (paper 64), PyramidDrop preset 52.5% (paper
    65, another schedule); FEATHER prompt KV 61.5% less at the bound. Longer
    prompts shrink every cut (at 41 text tokens FEATHER is ~60.5%)."""
    def cut(name, **kw):
        return 1 - flops_ratio(PRESETS[name], 32, 4096, 11008, PAPER_TOKENS, 17, **kw)

    assert cut("fastv") == pytest.approx(0.68, abs=0.02)  # paper: 68%
    # FEATHER at its expected stage-1 size (~287 of 274-299): paper 64%.
    assert cut("feather", kept=[287, int(287 * 0.09)]) == pytest.approx(0.64, abs=0.02)
    assert cut("feather") == pytest.approx(0.62, abs=0.01)  # at the upper bound
    # The preset halves at 8/16/24 (the schedule): 52%. The paper's
    # 65% was a more aggressive PyramidDrop schedule.
    assert cut("pyramiddrop") == pytest.approx(0.52, abs=0.01)
    assert 1 - kv_ratio(PRESETS["feather"], 32, PAPER_TOKENS, 17) == pytest.approx(0.60, abs=0.02)


def test_layer_counts():
    counts = layer_token_counts(PRESETS["feather"], 32, 576, 15, kept=[200, 18])
    assert counts[:8] == [591] * 8 and counts[8:16] == [215] * 8 and counts[16:] == [33] * 16
    # By default each layer counts the most its stages can keep.
    assert layer_token_counts(PRESETS["fastv"], 32, 576, 15)[2:5] == [591, 159, 159]


# -- statistics ------------------------------------------------------------------

@pytest.mark.parametrize(("kept", "mean_row"), [
    pytest.param(list(range(552, 576)), 1.0, id="bottom-row"),
    pytest.param(list(range(24)), 0.0, id="top-row"),
    pytest.param(uniform_grid(576, 3).tolist(), 21 / 2 / 23, id="grid-stride-3"),
])
def test_mean_row_of_a_square_image(kept, mean_row):
    assert region_stats(kept, ImageLayout.square(24))["image"]["mean_row"] == pytest.approx(mean_row)


def test_quadrant_coverage_of_a_square_image():
    stats = region_stats(list(range(552, 576)), ImageLayout.square(24))["image"]
    assert stats["kept"] == 24 and stats["tokens"] == 576
    assert stats["top_left"] == stats["top_right"] == 0
    assert stats["bottom_left"] == stats["bottom_right"] == pytest.approx(12 / 144)


# -- package surface ---------------------------------------------------------------

def test_cost_model_docstring_example():
    import doctest

    from feather_vllm.pruning import cost

    assert doctest.testmod(cost).failed == 0


def test_selection_edge_cases():
    one = select_stage(torch.rand(3), torch.tensor([4, 9, 20]), Stage(5, 0.1, "rope"), 36)
    assert one.numel() == 1  # int(3 * 0.1) = 0, but a stage keeps at least one token
    # A later grid stage re-adds only grid tokens that are still present.
    survivors = torch.tensor([0, 1, 2, 7, 14])
    kept = select_stage(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]), survivors, Stage(5, 0.2, "rope_free", 3), 36)
    assert kept.tolist() == [0, 14]  # top-1 (14) union grid {0, 3, 18, 21} among survivors
    with pytest.raises(ValueError, match="scores for"):
        select_stage(torch.rand(4), survivors, Stage(5, 0.5), 36)


def test_package_reexports_and_imports_no_vllm():
    import subprocess
    import sys

    import feather_vllm.pruning as pruning

    for name in pruning.__all__:
        assert getattr(pruning, name) is not None
    code = ("import sys, feather_vllm.pruning; "
            "sys.exit(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
