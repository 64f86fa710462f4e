"""Conversations about one image: a follow-up turn reuses the pruned KV
(and the kept set) of the turn that cut, from vLLM's prefix cache
(kv/reuse.py, docs/multi_turn_reuse.md).

One engine (prefix caching on, fp32, a step budget of 640 tokens, KV
stages starting at every preset's cut layer) serves 3-turn conversations
per preset, turn 3 long enough to be prefilled in two chunks; every turn's
tokens equal the independent transformers reference run on the same prompt
with turn 1's kept sets forced; so does a conversation whose cut falls
inside a KV stage. Then what must not reuse: other settings, another
image, another cache salt (API key), another first question, `reselect`
(nor keep another conversation's kept set). Then follow_up "keep_both":
each turn cuts again, keeping the previous turn's kept sets as well, and
reuses where no step can hold its cut. Last, follow_up "add_back": each
turn reuses turn 1's pruned KV and adds back what its own criterion ranks
highest of what turn 1 dropped, equal to the reference that defines it,
also in a step with another request's cut."""

from __future__ import annotations

import time

import pytest
import torch

from feather_vllm.kv.plan import report_of
from feather_vllm.pruning.config import PRESETS
from tests.helpers import engine_parts, make_llm, sample_images, shutdown
from tests.reference_hf import kept_lists, reference_add_back, reference_generate

BLOCK = 32
BUDGET = 640  # the cut's step (image + question) fits; turn 3's new text does not
MAX_TOKENS = 8
REUSING = ["fastv", "feather", "pyramiddrop"]
# KV stages start at every preset's cut (FastV's 3 too; the default 4-layer
# stages put it inside stage 0-3: SPLIT below is that case).
KV_BOUNDARIES = [3, 8, 12, 16, 20, 24, 28]
SPLIT = {"stages": [{"layer": 5, "keep": 0.5}]}  # a cut inside the KV stage 3-7
LONG = "Then tell me again, with every detail of the picture you can name. " * 20  # > BUDGET tokens


TURNS = ["Where is the red square?", "And the blue circle?", LONG]
SHORT_TURNS = TURNS[:2] + ["And the green one?"]  # their text after the image fits one step: keep_both cuts
KEEPING_BOTH = ["fastv", "pyramiddrop"]  # one cut inside a KV stage and one cut, three stages


def _prompt(text: str, image, salt: str | None = None) -> dict:
    prompt = {"prompt": text, "multi_modal_data": {"image": image}}
    if salt is not None:
        prompt["cache_salt"] = salt
    return prompt


def _params(feather, max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args={"feather": feather})


def _image(i: int):
    """A distinct image per index (< 9): the samples, flipped, mirrored."""
    from PIL import ImageOps

    return (sample_images()[i % 3], ImageOps.flip(sample_images()[i % 3]),
            ImageOps.mirror(sample_images()[i % 3]))[i // 3]


def _pixels(processor, image):
    """The reference's pixel values of `image`."""
    return processor.image_processor(images=image, return_tensors="pt")["pixel_values"]


def _converse(llm, feather, image, questions, salt=None, preempt_turn: int | None = None,
              max_tokens: list[int] | None = None):
    """Outputs of one conversation, turn by turn: each turn repeats the
    earlier turns (questions and answers) and asks the next question."""
    text, outs = "<s>", []
    for turn, question in enumerate(questions):
        text += f"USER: {'<image>' if turn == 0 else ''}\n{question}\nASSISTANT:"
        params = _params(feather, max_tokens[turn] if max_tokens else MAX_TOKENS)
        if turn == preempt_turn:
            out = _run_preempted(llm, _prompt(text, image, salt), params, f"preempted-{time.time_ns()}")
        else:
            out = llm.generate(_prompt(text, image, salt), params, use_tqdm=False)[0]
        outs.append(out)
        text += out.outputs[0].text + "</s>"
    return outs


def _run_preempted(llm, prompt, params, request_id):
    """One request, preempted (its blocks freed) after its first decode
    step and resumed, as vLLM's scheduler does when KV runs out."""
    scheduler, _, _ = engine_parts(llm)
    engine = llm.llm_engine
    engine.add_request(request_id, prompt, params)
    preempted = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert preempted
                return out
        # The engine's own id: the given one with a suffix.
        request = next(r for key, r in scheduler.requests.items() if key.startswith(request_id))
        if not preempted and request.num_output_tokens == 2:
            scheduler.running.remove(request)
            scheduler._preempt_request(request, time.monotonic())
            scheduler.prev_step_scheduled_req_ids.discard(request.request_id)
            preempted = True
    raise AssertionError("the request did not finish")


def _in_one_first_step(llm, prompts, params) -> list:
    """Outputs of `prompts`, submitted together; asserts that the first
    step computed every prompt (the step held all of them)."""
    scheduler, _, _ = engine_parts(llm)
    engine = llm.llm_engine
    ids = [f"together-{i}-{time.time_ns()}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params):
        engine.add_request(request_id, prompt, p)
    done = {}
    for out in engine.step():
        done[out.request_id] = out
    requests = [r for key, r in scheduler.requests.items() if key.startswith("together-")]
    assert len(requests) == len(prompts) and all(r.num_computed_tokens >= r.num_prompt_tokens for r in requests)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[request_id] for request_id in ids]


def _reusing(preset: str) -> dict:
    """`preset`, its follow-ups reusing (the feather preset's default)."""
    return {"preset": preset, "follow_up": "reuse"}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, block_size=BLOCK, enable_prefix_caching=True, enable_chunked_prefill=True,
                   max_num_batched_tokens=BUDGET, max_model_len=2048,
                   hf_overrides={"architectures": ["FeatherLlavaForConditionalGeneration"],
                                 "feather_kv_boundaries": KV_BOUNDARIES})
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def conversations(engine):
    """Per preset, a 3-turn conversation on an image of its own, reusing;
    one more with feather whose turn 2 is preempted while decoding and
    resumed; two turns with a cut inside a KV stage; 4 turns of fastv and of
    pyramiddrop keeping both selections."""
    out = {preset: _converse(engine, _reusing(preset), _image(i), TURNS) for i, preset in enumerate(REUSING)}
    out["preempted"] = _converse(engine, "feather", _image(3), TURNS, preempt_turn=1)
    out["split"] = _converse(engine, {**SPLIT, "follow_up": "reuse"}, _image(4), TURNS[:2])
    for i, preset in enumerate(KEEPING_BOTH):
        out[f"{preset}+keep_both"] = _converse(engine, {"preset": preset, "follow_up": "keep_both"},
                                               _image(6 + i), SHORT_TURNS + [LONG])
        # The same images, apart under a cache salt of their own.
        out[f"{preset}+add_back"] = _converse(engine, _adding_back(preset), _image(6 + i), SHORT_TURNS + [LONG],
                                              salt=ADD_BACK_SALT)
    # Two more add-back conversations about image 6, under salts of their
    # own: fastv's again, its turn 2 preempted while decoding, and pyramiddrop's.
    out["fastv+add_back+preempted"] = _converse(engine, _adding_back("fastv"), _image(6), SHORT_TURNS[:2],
                                                salt="preempted add-back", preempt_turn=1)
    out["pyramiddrop+add_back+image6"] = _converse(engine, _adding_back("pyramiddrop"), _image(6),
                                                   SHORT_TURNS[:2], salt="pyramiddrop on image 6")
    out["fastv+add_back+preempted-turn-1"] = _converse(engine, _adding_back("fastv"), _image(6), SHORT_TURNS[:1],
                                                       salt="preempted turn 1", preempt_turn=0)
    return out


ADD_BACK_SALT = "add-back conversations"


def _adding_back(preset: str) -> dict:
    return {"preset": preset, "follow_up": "add_back"}


CASES = [(preset, turn) for preset in REUSING + ["preempted"] for turn in range(3)]


@pytest.mark.parametrize("name,turn", CASES, ids=[f"{p}-turn{t + 1}" for p, t in CASES])
def test_turns_equal_the_reference_with_turn_1_kept_sets(hf, conversations, name, turn):
    """Greedy tokens of each turn equal the transformers reference on the
    same prompt with turn 1's kept sets forced (turn 1: decided there)."""
    processor, model = hf
    outs = conversations[name]
    preset = "feather" if name == "preempted" else name
    image = _image(3 if name == "preempted" else REUSING.index(name))
    kept = kept_lists(report_of(outs[0]).stages)
    pixels = _pixels(processor, image)
    ids = torch.tensor([outs[turn].prompt_token_ids])
    want = reference_generate(model, ids, pixels, PRESETS[preset], MAX_TOKENS, kept=None if turn == 0 else kept)
    assert list(outs[turn].outputs[0].token_ids) == want["token_ids"]
    assert want["kept"] == kept


@pytest.mark.parametrize("name", REUSING + ["preempted"])
def test_follow_up_turns_take_the_pruned_image_from_the_cache(conversations, name):
    """Turns 2 and 3 cut nothing: each reports turn 1's kept sets, reused
    from turn 1's request, and took at least the previous turn's whole
    prompt (the image included) from the prefix cache."""
    outs = conversations[name]
    first = report_of(outs[0])
    assert first.reused is None and first.stages
    for previous, out in zip(outs, outs[1:]):
        report = report_of(out)
        assert report.reused is not None and report.reused.kept_from == outs[0].request_id
        assert report.stages == first.stages
        assert min(out.num_cached_tokens, report.reused.tokens) >= len(previous.prompt_token_ids)
        if name != "preempted":  # a resumed turn reports its last life's hit, on its own blocks too
            assert out.num_cached_tokens == report.reused.tokens < len(out.prompt_token_ids)


def test_turn_2_holds_under_half_the_kv(conversations):
    """Feather's turn 2 holds the conversation so far (image, two questions,
    an answer) in <= 0.5x the blocks of the same tokens unpruned."""
    report = report_of(conversations["feather"][1])
    assert report.kv_blocks_used <= 0.5 * report.kv_blocks_unpruned_total, report


def test_a_cut_inside_a_kv_stage_is_reused(hf, conversations):
    """A cut at layer 5 falls inside KV stage 3-7: layers 3-4 hold every
    token and 5-7 compact KV, in one block table. The stage's blocks are
    hashed over the full token ids with the decision's digest (which fixes
    what the compact layers hold in them): turn 2 reuses them, cuts
    nothing, and equals the reference with turn 1's kept set forced."""
    from feather_vllm.pruning.config import resolve

    outs = conversations["split"]
    first, second = (report_of(out) for out in outs)
    assert first.reused is None and first.stages
    assert second.reused is not None and second.reused.kept_from == outs[0].request_id
    assert second.stages == first.stages
    assert outs[1].num_cached_tokens >= len(outs[0].prompt_token_ids)
    processor, model = hf
    kept = kept_lists(first.stages)
    pixels = _pixels(processor, _image(4))
    want = reference_generate(model, torch.tensor([outs[1].prompt_token_ids]), pixels, resolve(SPLIT), MAX_TOKENS,
                              kept=kept)
    assert list(outs[1].outputs[0].token_ids) == want["token_ids"]


def test_a_one_token_turn_1_is_reused(engine):
    """A turn 1 that ends with its first token (no later step) still leaves
    its prompt's end reachable: turn 2 reuses it."""
    outs = _converse(engine, "feather", _image(5), ["Where is the yellow circle?", "And the red one?"],
                     max_tokens=[1, MAX_TOKENS])
    report = report_of(outs[1])
    assert report.reused is not None and report.reused.tokens == len(outs[0].prompt_token_ids)


KEEP_BOTH_CASES = [(preset, turn) for preset in KEEPING_BOTH for turn in (1, 2)]


@pytest.mark.parametrize("preset,turn", KEEP_BOTH_CASES, ids=[f"{p}-turn{t + 1}" for p, t in KEEP_BOTH_CASES])
def test_keep_both_cuts_again_and_keeps_the_last_turns_kept_set(hf, conversations, preset, turn):
    """follow_up "keep_both": turns 2 and 3 cut again (nothing of the image
    from the cache), each stage keeping its own selection and what the
    previous turn kept there; tokens and kept sets equal the reference
    that selects for the same prompt and keeps the previous turn's too."""
    processor, model = hf
    outs = conversations[f"{preset}+keep_both"]
    previous, report = report_of(outs[turn - 1]), report_of(outs[turn])
    assert report.reused is None and report.united is not None
    assert report.united.kept_from == outs[turn - 1].request_id
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert outs[turn].num_cached_tokens <= outs[turn].prompt_token_ids.index(image_token)
    earlier = kept_lists(previous.stages)
    pixels = _pixels(processor, _image(6 + KEEPING_BOTH.index(preset)))
    want = reference_generate(model, torch.tensor([outs[turn].prompt_token_ids]), pixels, PRESETS[preset],
                              MAX_TOKENS, also=earlier)
    assert kept_lists(report.stages) == want["kept"]
    assert list(outs[turn].outputs[0].token_ids) == want["token_ids"]
    # The first cut keeps exactly what this prompt alone selects and what the previous turn kept.
    own = reference_generate(model, torch.tensor([outs[turn].prompt_token_ids]), pixels, PRESETS[preset], 1)
    assert set(report.stages[0].per_image[0]) == set(own["kept"][0][0]) | set(earlier[0][0])
    assert report.stages[0].total > previous.stages[0].total  # the new question added tokens


@pytest.mark.parametrize("preset", KEEPING_BOTH)
def test_keep_both_reuses_where_no_step_holds_a_cut(hf, conversations, preset):
    """keep_both's turn 4 (LONG: its text after the image exceeds any
    step) cannot cut: it reuses turn 3's pruned KV and kept set (not the
    unpruned fallback a cut would get), equal to the reference with them."""
    processor, model = hf
    outs = conversations[f"{preset}+keep_both"]
    third, fourth = report_of(outs[2]), report_of(outs[3])
    assert fourth.fallback is None and fourth.united is None
    assert fourth.reused is not None and fourth.reused.kept_from == outs[2].request_id
    assert fourth.stages == third.stages and outs[3].num_cached_tokens >= len(outs[2].prompt_token_ids)
    pixels = _pixels(processor, _image(6 + KEEPING_BOTH.index(preset)))
    want = reference_generate(model, torch.tensor([outs[3].prompt_token_ids]), pixels, PRESETS[preset], MAX_TOKENS,
                              kept=kept_lists(third.stages))
    assert list(outs[3].outputs[0].token_ids) == want["token_ids"]


ADD_BACK_CASES = KEEP_BOTH_CASES


def _add_back_reference(hf, out, preset: str, turn_1) -> dict:
    """The reference of `out`, a follow-up that adds back to turn 1's kept
    sets after the tokens its report says it took from the cache."""
    from feather_vllm.pruning.selection import stage_keep_count

    processor, model = hf
    stage = PRESETS[preset].stages[0]
    first = report_of(turn_1).stages[0]
    add = min(stage_keep_count(576, stage), 576 - first.total)
    return reference_add_back(model, torch.tensor([out.prompt_token_ids]),
                              _pixels(processor, _image(6 + KEEPING_BOTH.index(preset))), PRESETS[preset],
                              MAX_TOKENS, kept_lists(report_of(turn_1).stages), report_of(out).reused.tokens, add)


@pytest.mark.parametrize("preset,turn", ADD_BACK_CASES, ids=[f"{p}-turn{t + 1}" for p, t in ADD_BACK_CASES])
def test_add_back_reuses_turn_1_and_adds_what_its_question_ranks_highest(hf, conversations, preset, turn):
    """follow_up "add_back": turns 2 and 3 take turn 1's pruned KV (the
    image included) from the cache, cut nothing, and add back the first
    stage's top-k size of what turn 1 dropped, as their own criterion
    ranks them; tokens, the added tokens and every stage's kept set equal
    the reference (added tokens after the cached ones, at their own
    positions). An added turn's blocks are no cut's layout: turn 3 adds
    to turn 1, not to turn 2. The last KV group (after every cut) holds
    exactly the turn's tokens less turn 1's drops plus the added ones."""
    outs = conversations[f"{preset}+add_back"]
    first, report = report_of(outs[0]), report_of(outs[turn])
    assert report.united is None and report.fallback is None
    assert report.reused is not None and report.reused.kept_from == outs[0].request_id
    assert outs[turn].num_cached_tokens == report.reused.tokens >= len(outs[0].prompt_token_ids)
    want = _add_back_reference(hf, outs[turn], preset, outs[0])
    assert report.reused.added == len(want["added"][0]) > 0
    assert sorted(set(report.stages[0].per_image[0]) - set(first.stages[0].per_image[0])) == want["added"][0]
    assert kept_lists(report.stages) == want["kept"]
    assert list(outs[turn].outputs[0].token_ids) == want["token_ids"]
    tokens = len(outs[turn].prompt_token_ids) + MAX_TOKENS - 1
    assert report.kv_blocks_held[-1] == -(-(tokens - 576 + report.stages[-1].total) // BLOCK)


def test_add_back_adds_its_share(hf, engine):
    """`"add_back": 0.05`: fastv's turn 2 adds back int(576 * 0.05) = 28
    tokens, equal to the reference with as many."""
    processor, model = hf
    feather = {**_adding_back("fastv"), "add_back": 0.05}
    outs = _converse(engine, feather, _image(6), SHORT_TURNS[:2], salt="a smaller add-back")
    report = report_of(outs[1])
    assert report.reused is not None and report.reused.added == 28
    want = reference_add_back(model, torch.tensor([outs[1].prompt_token_ids]), _pixels(processor, _image(6)),
                              PRESETS["fastv"], MAX_TOKENS, kept_lists(report_of(outs[0]).stages),
                              report.reused.tokens, 28)
    assert kept_lists(report.stages) == want["kept"]
    assert list(outs[1].outputs[0].token_ids) == want["token_ids"]


@pytest.mark.parametrize("preset", KEEPING_BOTH)
def test_add_back_reuses_alone_where_no_step_holds_the_rest(hf, conversations, preset):
    """add_back's turn 4 (its text after the cache hit exceeds any step,
    so its last token cannot rank tokens in the step that would add them):
    a plain reuse of turn 1's pruned KV, equal to the reference with turn
    1's kept sets."""
    processor, model = hf
    outs = conversations[f"{preset}+add_back"]
    report = report_of(outs[3])
    assert report.reused is not None and report.reused.added == 0
    assert report.reused.kept_from == outs[0].request_id and report.stages == report_of(outs[0]).stages
    pixels = _pixels(processor, _image(6 + KEEPING_BOTH.index(preset)))
    want = reference_generate(model, torch.tensor([outs[3].prompt_token_ids]), pixels, PRESETS[preset], MAX_TOKENS,
                              kept=kept_lists(report_of(outs[0]).stages))
    assert list(outs[3].outputs[0].token_ids) == want["token_ids"]


def test_an_added_back_turn_preempted_adds_back_again(conversations):
    """fastv's add-back conversation again (under a salt of its own), its
    turn 2 preempted while decoding: resumed, it adds back again from turn
    1's pruned KV (its own were freed), with the same tokens and kept sets."""
    outs = conversations["fastv+add_back+preempted"]
    want = conversations["fastv+add_back"][1]
    report = report_of(outs[1])
    assert report.reused is not None and report.reused.added > 0 and report.reused.kept_from == outs[0].request_id
    assert report.stages == report_of(want).stages
    assert list(outs[1].outputs[0].token_ids) == list(want.outputs[0].token_ids)


def test_a_preempted_turn_1_goes_on_as_it_began(conversations):
    """fastv's turn 1 under add_back, preempted while decoding: resumed, it
    finds its own cut in the cache (the same prompt) and reuses it without
    adding anything (its criterion already ranked for this question), so
    its tokens and kept sets are those of the same turn never preempted."""
    (out,) = conversations["fastv+add_back+preempted-turn-1"]
    want = conversations["fastv+add_back"][0]
    report = report_of(out)
    assert report.reused is not None and report.reused.added == 0
    assert report.stages == report_of(want).stages
    assert list(out.outputs[0].token_ids) == list(want.outputs[0].token_ids)


def test_add_backs_share_a_step(engine, conversations):
    """Three add-back turns 2 about image 6 in one step (one encoding
    serves them): two fastv ones (first cut at layer 3) and pyramiddrop's
    (at layer 8). Each equals its run alone."""
    names = ["fastv+add_back", "fastv+add_back+preempted", "pyramiddrop+add_back+image6"]
    salts = [ADD_BACK_SALT, "preempted add-back", "pyramiddrop on image 6"]
    alone = [conversations[name][1] for name in names]
    together = _in_one_first_step(engine, [_prompt(out.prompt, _image(6), salt) for out, salt in zip(alone, salts)],
                                  [_params(_adding_back(name.split("+")[0])) for name in names])
    for got, want in zip(together, alone):
        assert report_of(got).reused.added > 0
        assert list(got.outputs[0].token_ids) == list(want.outputs[0].token_ids)
        assert report_of(got).stages == report_of(want).stages


def test_add_back_shares_a_step_with_a_cut(engine, conversations):
    """fastv's add-back turn 2 again, in one step with another
    conversation's turn 1 (a cut; reselect: it takes no earlier turn's KV)
    about the same image, under another cache salt (one image's encoding
    serves both: the step's encoder budget holds one): the step's rows
    hold the added turn's probes, its added tokens and its question, and
    the other request's image, cut. Both equal their runs alone."""
    outs = conversations["fastv+add_back"]
    other = _prompt("<s>USER: <image>\nWhere is the red square?\nASSISTANT:", _image(6), salt="a step shared")
    other_params = _params({"preset": "pyramiddrop", "follow_up": "reselect"})
    alone = engine.generate(other, other_params, use_tqdm=False)[0]
    turn_2 = _prompt(outs[1].prompt, _image(6), ADD_BACK_SALT)
    together = _in_one_first_step(engine, [turn_2, other], [_params(_adding_back("fastv")), other_params])
    assert report_of(together[0]).reused.added > 0 and report_of(together[1]).reused is None
    assert list(together[0].outputs[0].token_ids) == list(outs[1].outputs[0].token_ids)
    assert report_of(together[0]).stages == report_of(outs[1]).stages
    assert list(together[1].outputs[0].token_ids) == list(alone.outputs[0].token_ids)
    assert report_of(together[1]).stages == report_of(alone).stages


def test_a_cut_whose_bound_is_the_whole_image_is_never_read_unpruned(engine):
    """A stage whose reservation bound is the whole image (top 80% united
    with every second row and column: 460 + 144 > 576) may still drop
    tokens: its blocks are compacted, never offered under the full token
    sequence's hashes, so the same prompt unpruned takes nothing from the
    image on (it took 576 tokens when such a stage counted as uncompacted)."""
    from feather_vllm.pruning.config import resolve
    from feather_vllm.pruning.layout import ImageLayout, layout_kept_per_stage_max

    wide = {"stages": [{"layer": 8, "keep": 0.8, "grid_stride": 2}]}
    assert layout_kept_per_stage_max(resolve(wide), ImageLayout.square(24)) == [576]
    prompt = _prompt("<s>USER: <image>\nWhere is the red square?\nASSISTANT:", _image(8))
    pruned = engine.generate(prompt, _params(wide), use_tqdm=False)[0]
    assert report_of(pruned).stages[0].total < 576  # it dropped tokens
    unpruned = engine.generate(prompt, _params("none"), use_tqdm=False)[0]
    image_token = engine.llm_engine.model_config.hf_config.image_token_index
    assert unpruned.num_cached_tokens <= unpruned.prompt_token_ids.index(image_token)


ISOLATION = {
    "other-settings": dict(feather="pyramiddrop"),
    "other-image": dict(image=5),
    "other-api-key": dict(salt="another key"),
    "other-first-question": dict(first_question="Where is the green circle?"),
    "reselect": dict(feather={"preset": "feather", "reselect": True}),
}
# The changes that name no settings, under each policy that takes an earlier turn's selection.
CROSSING = [(case, policy) for case in ISOLATION for policy in ("reuse", "keep_both")
            if policy == "reuse" or "feather" not in ISOLATION[case]]


@pytest.mark.parametrize("case,policy", CROSSING, ids=[f"{c}-{p}" for c, p in CROSSING])
def test_reuse_never_crosses(engine, conversations, case, policy):
    """Feather's turn 2 again, changed in one respect: it takes nothing
    from the image on out of the cache, and cuts for itself; under
    keep_both, it keeps no other conversation's kept set."""
    change = ISOLATION[case]
    turn_2 = conversations["feather"][1]
    question = TURNS[0]
    text = turn_2.prompt.replace(question, change.get("first_question", question))
    prompt = _prompt(text, _image(change.get("image", REUSING.index("feather"))), change.get("salt"))
    out = engine.generate(prompt, _params(change.get("feather", {"preset": "feather", "follow_up": policy})),
                          use_tqdm=False)[0]
    report = report_of(out)
    assert report.reused is None and report.united is None and report.stages
    image_token = engine.llm_engine.model_config.hf_config.image_token_index
    assert out.num_cached_tokens <= out.prompt_token_ids.index(image_token)
