"""Pruned layers hold only surviving tokens: KV blocks per stage group,
no padding layers, reports with the blocks really held, aborts, observed in
the real engine's scheduler and block pool."""

from __future__ import annotations

import math
import random

import pytest

from feather_vllm.kv.plan import report_of
from feather_vllm.pruning import config as pcfg
from feather_vllm.pruning.cost import kept_per_stage_max
from tests.helpers import (
    blocks_per_group,
    engine_parts,
    image_prompt,
    make_llm,
    sample_images,
    shutdown,
)

BLOCK = 32
PRESETS = ["none", "fastv", "feather", "pyramiddrop"]
QUESTION = "Where is the red square?"


def _params(preset, max_tokens=8, **kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args={"feather": preset}, **kw)


def _run_to_end(engine) -> dict[str, object]:
    """Finished outputs by request id."""
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o
    return out


def _predicted_blocks(kv, preset: str, prompt_len: int, image_tokens: int) -> list[int]:
    """Blocks each group should hold after the prefill, from the pure cost model."""
    cfg = pcfg.resolve(preset)
    cuts = list(zip(cfg.cut_layers, kept_per_stage_max(cfg, image_tokens)))
    out = []
    for group in kv.kv_cache_config.kv_cache_groups:
        first = group.kv_cache_spec.feather_first_layer
        kept = [k for layer, k in cuts if layer <= first]
        dropped = image_tokens - kept[-1] if kept else 0
        out.append(math.ceil((prompt_len - dropped) / BLOCK))
    return out


def _kept_blocks_of(kv, stages, tokens: int, image_tokens: int = 576) -> list[int]:
    """Blocks each group needs for `tokens` tokens given what the cuts
    (`stages`, StageKept) really kept."""
    out = []
    for group in kv.kv_cache_config.kv_cache_groups:
        kept = [s.total for s in stages if s.layer <= group.kv_cache_spec.feather_first_layer]
        dropped = image_tokens - kept[-1] if kept else 0
        out.append(math.ceil((tokens - dropped) / BLOCK))
    return out


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint, block_size=BLOCK)
    yield engine
    shutdown(engine)


def test_groups_follow_stage_boundaries_without_padding(llm):
    """Default boundaries: 8 equal stages of 4 layers; vLLM makes one group
    of each with no padding layer (every group holds exactly 4 layers)."""
    _, kv, model = engine_parts(llm)
    assert model.kv_boundaries == [4, 8, 12, 16, 20, 24, 28]
    stages = {}
    for group in kv.kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        for name in group.layer_names:
            layer = int(name.split(".layers.")[1].split(".")[0])
            stages[layer] = spec.feather_first_layer
    assert stages == {i: i // 4 * 4 for i in range(32)}
    assert [len(g.layer_names) for g in kv.kv_cache_config.kv_cache_groups] == [4] * 8


@pytest.mark.parametrize("preset", PRESETS)
def test_blocks_per_group_equal_prediction(llm, preset):
    _, kv, _ = engine_parts(llm)
    engine = llm.llm_engine
    free_before = kv.block_pool.get_num_free_blocks()
    engine.add_request(f"blocks-{preset}", image_prompt(sample_images()[1], QUESTION), _params(preset, 4))
    engine.step()  # the prefill step
    (rid,) = [r for r in kv.coordinator.single_type_managers[0].req_to_blocks]
    request = engine.engine_core.engine_core.scheduler.requests[rid]
    held = blocks_per_group(kv, rid)
    assert held == _predicted_blocks(kv, preset, request.num_prompt_tokens, 576)
    expected = {
        "none": [19] * 8,
        # FastV cuts at 3, inside stage [0, 4): that stage holds everything,
        # the later ones 15 text + 144 image tokens.
        "fastv": [19] + [5] * 7,
        # 591-token prompt: 15 text + 576 image tokens; stage 1 reserves
        # 172 + 64 grid, stage 2 int(236 * 0.09) = 21.
        "feather": [19, 19, 8, 8, 2, 2, 2, 2],
        "pyramiddrop": [19, 19, 10, 10, 5, 5, 3, 3],
    }
    assert held == expected[preset]
    (finished,) = _run_to_end(engine).values()
    report = report_of(finished)
    assert kv.block_pool.get_num_free_blocks() == free_before
    # Once the cut's real counts came back, each group holds only what was
    # kept (the reservation's surplus blocks went back to the pool); at
    # finish the first 3 of the 4 generated tokens are in the KV cache too.
    assert list(report.kv_blocks_held) == _kept_blocks_of(kv, report.stages, request.num_prompt_tokens + 3)
    assert list(report.kv_blocks_unpruned) == expected["none"]
    assert report.preset == preset and report.image_tokens == (576,) and report.fallback is None
    kept = [stage.total for stage in report.stages]
    bounds = kept_per_stage_max(pcfg.resolve(preset), 576)
    assert len(kept) == len(bounds) and all(k <= b for k, b in zip(kept, bounds))


@pytest.mark.parametrize(("preset", "bound_is_exact"), [("feather", False), ("fastv", True)])
def test_reservation_trimmed_to_what_the_cut_kept(llm, monkeypatch, preset, bound_is_exact):
    """The plan reserves each stage's upper bound; once the cut's real
    counts are back, every group holds exactly what the kept tokens need,
    and the surplus blocks are back in the pool (prompts of several lengths,
    so some bound and real count fall in different blocks). FEATHER's bound
    (top-k plus the whole grid) exceeds what the union keeps; FastV keeps
    exactly its bound, so nothing is freed."""
    scheduler, kv, _ = engine_parts(llm)
    engine = llm.llm_engine
    reserved: dict[str, list[int]] = {}
    schedule = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        for rid in list(kv.coordinator.single_type_managers[0].req_to_blocks):
            reserved.setdefault(rid, blocks_per_group(kv, rid))
        return out

    monkeypatch.setattr(scheduler, "schedule", recording_schedule)
    shrank = 0
    for pad in range(0, 32, 4):
        free_before = kv.block_pool.get_num_free_blocks()
        engine.add_request(f"trim-{preset}-{pad}", image_prompt(sample_images()[pad % 3], QUESTION + " x" * pad),
                           _params(preset, 4))
        engine.step()  # the cutting prefill, and its output: kept tokens back, surplus freed
        (rid,) = kv.coordinator.single_type_managers[0].req_to_blocks
        request = scheduler.requests[rid]
        assert reserved[rid] == _predicted_blocks(kv, preset, request.num_prompt_tokens, 576)
        held = blocks_per_group(kv, rid)
        assert held == _kept_blocks_of(kv, request.feather_pruning.kept.stages, request.num_computed_tokens)
        assert kv.block_pool.get_num_free_blocks() == free_before - sum(held)
        shrank += sum(held) < sum(reserved[rid])
        _run_to_end(engine)
        assert kv.block_pool.get_num_free_blocks() == free_before
    assert (shrank == 0) == bound_is_exact


def test_mixed_run_with_aborts_frees_every_block(llm):
    """200 requests: presets, text-only, aborts; every block comes back."""
    _, kv, _ = engine_parts(llm)
    engine = llm.llm_engine
    free_before = kv.block_pool.get_num_free_blocks()
    rng = random.Random(0)
    images = sample_images()
    ids = []
    for i in range(200):
        preset = rng.choice(PRESETS)
        if i % 5 == 0:
            prompt = {"prompt": f"<s>USER: tell me about number {i}\nASSISTANT:"}
        else:
            prompt = image_prompt(rng.choice(images), QUESTION)
        engine.add_request(f"mix-{i}", prompt, _params(preset, rng.randint(1, 6)))
        ids.append(f"mix-{i}")
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps % 3 == 0:
            engine.abort_request([ids.pop(rng.randrange(len(ids)))], internal=False)
    assert kv.block_pool.get_num_free_blocks() == free_before
    # The worker hears of the last finished requests with the next step.
    engine.add_request("mix-flush", {"prompt": "<s>USER: hi\nASSISTANT:"}, _params("none", 1))
    _run_to_end(engine)
    # No pruning state outlives its request, scheduler side or worker side.
    runner = engine.model_executor.driver_worker.worker.model_runner
    assert [m.tracked for m in kv.coordinator.single_type_managers] == [{}] * 8
    assert kv._feather_new_plans == {} and runner._feather_pending == {}
    assert [r for r in runner.requests if not r.startswith("mix-flush")] == []


