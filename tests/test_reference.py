"""The transformers reference (tests/reference_hf.py) against transformers
itself and the cost model, on the tiny checkpoint (24 x 24 = 576 image
tokens, 32 layers, 2 query heads on 1 KV head). No vLLM here."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from feather_vllm.pruning import (
    PRESETS,
    NonSquareGridError,
    PruningConfig,
    PruningConfigError,
    Stage,
    kept_per_stage_bounds,
    kept_per_stage_max,
    last_token_image_attention,
    layer_token_counts,
    uniform_grid,
)
from tests.helpers import sample_images
from tests.reference_hf import reference_add_back, reference_generate

MAX_TOKENS = 16
NUM_IMAGE = 576


@pytest.fixture(scope="module")
def inputs(hf):
    processor, _ = hf
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the red square?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(images=sample_images()[1], text=text, return_tensors="pt")


@pytest.fixture(scope="module")
def two_image_inputs(hf):
    processor, _ = hf
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Left picture."},
                                                 {"type": "image"}, {"type": "text", "text": "Where is it?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(images=[sample_images()[1], sample_images()[2]], text=text, return_tensors="pt")


def _run(hf, inputs, config: PruningConfig, max_new_tokens: int = MAX_TOKENS, **kw) -> dict:
    return reference_generate(hf[1], inputs["input_ids"], inputs["pixel_values"], config, max_new_tokens, **kw)


def _one_image(kept: list[list[list[int]]]) -> list[list[int]]:
    """Per stage, the kept set of a one-image prompt."""
    assert all(len(per_image) == 1 for per_image in kept)
    return [per_image[0] for per_image in kept]


@pytest.fixture(scope="module")
def unpruned(hf, inputs):
    return _run(hf, inputs, PRESETS["none"])


def _image_span(model, input_ids) -> tuple[int, int]:
    positions = torch.nonzero(input_ids[0] == model.config.image_token_index).flatten()
    return int(positions[0]), positions.numel()


def test_prompt_layout(hf, inputs):
    start, count = _image_span(hf[1], inputs["input_ids"])
    assert count == NUM_IMAGE and start + count < inputs["input_ids"].shape[1]


def test_no_pruning_equals_hf_generate(hf, inputs, unpruned):
    _, model = hf
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, prompt_len:].tolist()
    assert len(tokens) == MAX_TOKENS  # no early EOS with this seed: a full comparison
    assert unpruned["token_ids"] == tokens
    hf_logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]
    assert unpruned["logprobs"] == pytest.approx(hf_logprobs, abs=1e-4)
    assert unpruned["kept"] == [] and unpruned["layer_tokens"] == [prompt_len] * 32


@pytest.mark.parametrize("preset", ["fastv", "feather", "pyramiddrop"])
def test_kept_counts_match_the_cost_model(hf, inputs, preset):
    config = PRESETS[preset]
    out = _run(hf, inputs, config, max_new_tokens=1)  # the kept sets are decided on the prompt
    kept_sets = _one_image(out["kept"])
    counts = [len(k) for k in kept_sets]
    previous = list(range(NUM_IMAGE))
    for stage, kept, (lo, hi) in zip(config.stages, kept_sets, kept_per_stage_bounds(config, NUM_IMAGE)):
        assert kept == sorted(set(kept)) and set(kept) <= set(previous)  # ascending survivors of the survivors
        assert lo <= len(kept) <= hi
        if stage.grid_stride:
            assert set(uniform_grid(NUM_IMAGE, stage.grid_stride).tolist()) <= set(kept)
        else:
            assert len(kept) == int(len(previous) * stage.keep)
        previous = kept
    if preset != "feather":  # no grid: the count is exact
        assert counts == kept_per_stage_max(config, NUM_IMAGE)
    text = inputs["input_ids"].shape[1] - NUM_IMAGE
    assert out["layer_tokens"] == layer_token_counts(config, 32, NUM_IMAGE, text, kept=counts)


def _unpruned_qk(model, inputs, stage: Stage) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Queries and keys of the layer before `stage`'s cut in transformers'
    own unpruned forward (RoPE'd when the criterion says so), and its scale."""
    lm = model.model.language_model
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
        layer = lm.layers[stage.layer - 1]
        x = layer.input_layernorm(states[stage.layer - 1])  # states[i] enters layer i
        attn = layer.self_attn
        q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        if stage.criterion == "rope":
            cos, sin = lm.rotary_emb(x, position_ids=torch.arange(x.shape[1])[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, attn.scaling


@pytest.mark.parametrize("num_images", [1, 2], ids=["one-image", "two-images"])
@pytest.mark.parametrize("preset", ["fastv", "feather"])
def test_first_cut_scores_come_from_the_layer_before(hf, inputs, two_image_inputs, preset, num_images):
    """Recompute the first cut from transformers' own unpruned forward: the
    hidden state entering layer L-1, its q/k projections, RoPE or not; with
    two images, each image's own softmax, top fraction and grid."""
    _, model = hf
    inputs = inputs if num_images == 1 else two_image_inputs
    stage = PRESETS[preset].stages[0]
    q, k, scaling = _unpruned_qk(model, inputs, stage)
    positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_index).flatten()
    assert positions.numel() == NUM_IMAGE * num_images
    expected = []
    for start in positions[::NUM_IMAGE].tolist():
        scores = last_token_image_attention(q[0, :, -1], k[0, :, start:start + NUM_IMAGE].transpose(0, 1), scaling)
        kept = set(torch.topk(scores, int(NUM_IMAGE * stage.keep)).indices.tolist())
        if stage.grid_stride:
            kept |= set(uniform_grid(NUM_IMAGE, stage.grid_stride).tolist())
        expected.append(sorted(kept))
    assert _run(hf, inputs, PRESETS[preset], max_new_tokens=1)["kept"][0] == expected


def test_keeping_everything_equals_no_pruning(hf, inputs, unpruned):
    config = PruningConfig((Stage(3, 1.0, "rope"), Stage(8, 1.0, "rope_free", 3), Stage(16, 1.0, "rope_free")))
    out = _run(hf, inputs, config)
    assert out["kept"] == [[list(range(NUM_IMAGE))]] * 3
    assert out["token_ids"] == unpruned["token_ids"]
    assert out["logprobs"] == pytest.approx(unpruned["logprobs"], abs=1e-5)


def test_cached_decode_equals_recomputing_the_pruned_forward(hf, inputs):
    cached = _run(hf, inputs, PRESETS["feather"], max_new_tokens=4)
    recomputed = _run(hf, inputs, PRESETS["feather"], max_new_tokens=4, decode="recompute")
    assert cached["kept"] == recomputed["kept"] and cached["token_ids"] == recomputed["token_ids"]
    assert cached["logprobs"] == pytest.approx(recomputed["logprobs"], abs=1e-4)


def test_out_of_scope_layouts_and_settings_are_refused(hf, inputs):
    ids = inputs["input_ids"]
    start, _ = _image_span(hf[1], ids)
    one_short = torch.cat([ids[:, :start], ids[:, start + 1:]], dim=1)  # 575 image tokens
    with pytest.raises(NonSquareGridError, match="not a square"):
        reference_generate(hf[1], one_short, inputs["pixel_values"], PRESETS["fastv"], 1)
    with pytest.raises(PruningConfigError) as err:
        _run(hf, inputs, PruningConfig((Stage(32, 0.5),)), max_new_tokens=1)
    assert err.value.field == "stages[0].layer"


@pytest.fixture(scope="module")
def follow_up(hf, inputs):
    """A follow-up turn after `inputs` (its answer, a new question), and
    where the first turn's prompt ends in it."""
    processor, _ = hf
    question = [{"type": "image"}, {"type": "text", "text": "Where is the red square?"}]
    conversation = [{"role": "user", "content": question},
                    {"role": "assistant", "content": [{"type": "text", "text": "top-left"}]},
                    {"role": "user", "content": [{"type": "text", "text": "And the blue circle?"}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    out = processor(images=sample_images()[1], text=text, return_tensors="pt")
    history_end = inputs["input_ids"].shape[1]
    assert torch.equal(out["input_ids"][0, :history_end], inputs["input_ids"][0])
    return out, history_end


@pytest.mark.parametrize("preset", ["fastv", "pyramiddrop"])
def test_add_back_of_nothing_is_reuse(hf, inputs, follow_up, preset):
    """Adding nothing back is the reuse reference: turn 1's kept sets forced."""
    turn_1 = _run(hf, inputs, PRESETS[preset], max_new_tokens=1)["kept"]
    turn_2, history_end = follow_up
    reused = _run(hf, turn_2, PRESETS[preset], max_new_tokens=4, kept=turn_1)
    none = reference_add_back(hf[1], turn_2["input_ids"], turn_2["pixel_values"], PRESETS[preset], 4, turn_1,
                              history_end, add=0)
    assert none["added"] == [[]] and none["kept"] == turn_1 and none["token_ids"] == reused["token_ids"]


def test_add_back_adds_the_new_questions_top_dropped_tokens(hf, inputs, follow_up):
    """The tokens added back are the top of those turn 1 dropped, by the
    follow-up's criterion in the layer before the cut (transformers' own
    unpruned forward: layers before the cut see the whole sequence), and
    every stage keeps them."""
    config = PRESETS["fastv"]
    turn_1 = _run(hf, inputs, config, max_new_tokens=1)["kept"]
    turn_2, history_end = follow_up
    out = reference_add_back(hf[1], turn_2["input_ids"], turn_2["pixel_values"], config, 2, turn_1, history_end,
                             add=40)
    q, k, scaling = _unpruned_qk(hf[1], turn_2, config.stages[0])
    start, _ = _image_span(hf[1], turn_2["input_ids"])
    dropped = torch.tensor(sorted(set(range(NUM_IMAGE)) - set(turn_1[0][0])))
    scores = last_token_image_attention(q[0, :, -1], k[0, :, start + dropped].transpose(0, 1), scaling)
    assert out["added"] == [sorted(dropped[torch.topk(scores, 40).indices].tolist())]
    assert out["kept"] == [[sorted(set(turn_1[0][0]) | set(out["added"][0]))]]
