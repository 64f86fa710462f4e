"""Request lifecycles: pruned and unpruned requests preempted while
decoding and recomputed in several chunks (long text before the image, a
step budget smaller than text + image + tail) give exactly the tokens of
the same requests on a roomy KV pool, with prefix caching on and off.

This is the scenario vLLM's own server passes; before the worker's pruning
state followed the request's lifecycle, a recompute's text-only chunk ran
with the previous life's kept tokens (wrong answers, NaN logprobs that
spread to unpruned requests)."""

from __future__ import annotations

import math

import pytest

from feather_vllm.kv.plan import report_of
from tests.helpers import engine_parts, make_llm, sample_images, shutdown

BUDGET = 700  # text (~520 tokens) + image (576) + tail never fit one step
PRESETS = ["feather", "fastv", "none", "pyramiddrop"] * 3
MAX_TOKENS = 200
NEAR_TIE = 1e-3  # fp32: a recompute's batch shapes may flip the argmax of two logprobs this close
SMALL_POOL = 14 * 2**20  # admits several prompts, not their answers: preemptions while decoding


def _prompt(i: int) -> dict:
    text = f"Notes {i}: " + "the quick brown fox jumps over the lazy dog. " * 16
    return {"prompt": f"<s>USER: {text}<image>\nWhere is the red square? ({i})\nASSISTANT:",
            "multi_modal_data": {"image": sample_images()[i % 3]}}


def _params(preset):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2,
                          extra_args={"feather": preset})


def _run(checkpoint, **kwargs) -> tuple[dict, list[str], set[int]]:
    """Outputs by request, the presets of the requests preempted after
    their cut (or, unpruned, their prefill), and the prefill chunk
    boundaries seen."""
    llm = make_llm(checkpoint, enable_chunked_prefill=True, max_num_batched_tokens=BUDGET, max_model_len=1408,
                   block_size=32, **kwargs)
    try:
        scheduler, _, _ = engine_parts(llm)
        engine = llm.llm_engine
        preempted: list[str] = []
        preempt = scheduler._preempt_request

        def counted(req, *args, **kwargs):
            if req.num_computed_tokens >= req.num_prompt_tokens:
                preempted.append(req.sampling_params.extra_args["feather"])
            return preempt(req, *args, **kwargs)

        scheduler._preempt_request = counted
        for i, preset in enumerate(PRESETS):
            engine.add_request(f"r{i}", _prompt(i), _params(preset))
        outs, chunked = {}, set()
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o
            for request in scheduler.running:
                if 0 < request.num_computed_tokens < request.num_prompt_tokens:
                    chunked.add(request.num_computed_tokens)
        return outs, preempted, chunked
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    outs, preempted, chunked = _run(tiny_checkpoint)
    assert preempted == [] and chunked  # roomy pool: chunked, never preempted
    return outs


@pytest.fixture(scope="module", params=[False, True], ids=["prefix-caching-off", "prefix-caching-on"])
def tight(request, tiny_checkpoint):
    outs, preempted, _ = _run(tiny_checkpoint, kv_cache_bytes=SMALL_POOL, enable_prefix_caching=request.param)
    return outs, preempted


def test_pruned_requests_were_preempted_after_their_cut(tight):
    assert set(tight[1]) - {"none"}


def _first_difference(got, want) -> int | None:
    """Index of the first token where `got` leaves `want`, unless that is a
    numerical near-tie (the two tokens within NEAR_TIE in both runs: the
    rest of the answer then legitimately differs). None: equal or a tie."""
    a, b = list(got.outputs[0].token_ids), list(want.outputs[0].token_ids)
    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
    if i is None:
        return None if len(a) == len(b) else min(len(a), len(b))
    for run in (got, want):
        step = run.outputs[0].logprobs[i]
        if a[i] not in step or b[i] not in step or abs(step[a[i]].logprob - step[b[i]].logprob) > NEAR_TIE:
            return i
    return None


@pytest.mark.parametrize("i", range(len(PRESETS)), ids=[f"r{i}-{p}" for i, p in enumerate(PRESETS)])
def test_tokens_equal_roomy_pool(reference, tight, i):
    got, want = tight[0][f"r{i}"], reference[f"r{i}"]
    assert _first_difference(got, want) is None, (got.outputs[0].token_ids, want.outputs[0].token_ids)
    logprobs = [lp for step in got.outputs[0].logprobs for lp in step.values()]
    assert all(math.isfinite(lp.logprob) for lp in logprobs)
    got_report, want_report = report_of(got), report_of(want)
    assert got_report.fallback is None and got_report.stages == want_report.stages
    if PRESETS[i] != "none":
        assert got_report.stages


def test_a_resume_that_falls_back_runs_unpruned(tiny_checkpoint, monkeypatch):
    """A request pruned in its first life whose resume the scheduler runs
    unpruned (forced here: any decision after a preemption falls back):
    the worker forgets the first life's cut (no stale state: its KV is
    recomputed in full), the report says so, and the answer stays finite."""
    from feather_vllm.kv import runner_v1, scheduler_hook
    from feather_vllm.pruning.schedule import FallbackReason

    decide = scheduler_hook._decide

    def falls_back_on_resume(manager, spec, request, *args):
        decided = decide(manager, spec, request, *args)
        if request.num_preemptions and decided.plan is not None:
            decided.plan, decided.fallback = None, FallbackReason.PROMPT_SPLIT
        return decided

    monkeypatch.setattr(scheduler_hook, "_decide", falls_back_on_resume)
    llm = make_llm(tiny_checkpoint, enable_chunked_prefill=True, max_num_batched_tokens=BUDGET, max_model_len=1408,
                   block_size=32, kv_cache_bytes=SMALL_POOL)
    try:
        scheduler, _, _ = engine_parts(llm)
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        engine = llm.llm_engine
        for i, preset in enumerate(PRESETS):
            engine.add_request(f"r{i}", _prompt(i), _params(preset))
        outs, stale = {}, []
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o
            for request in scheduler.running:
                pruning = getattr(request, scheduler_hook.ATTR, None)
                state = getattr(runner.requests.get(request.request_id), runner_v1.ATTR, None)
                if request.num_preemptions and pruning is not None and pruning.fallback is not None \
                        and state is not None:
                    stale.append(request.request_id)
    finally:
        shutdown(llm)
    resumed = [o for o in outs.values() if report_of(o).fallback is FallbackReason.PROMPT_SPLIT]
    assert resumed and not stale
    for out in resumed:
        report = report_of(out)
        assert report.stages == () and report.kv_blocks_held == report.kv_blocks_unpruned
        assert all(math.isfinite(lp.logprob) for step in out.outputs[0].logprobs for lp in step.values())
