"""After the cut, a pruned request decodes through vLLM's own forward: only
its metadata differs, built on the device for the whole batch, with no
host round trip per request, and built once per KV group (as unpruned)
when the cuts fall on KV-stage starts."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.helpers import engine_parts, image_prompt, make_llm, sample_images, shutdown

QUESTION = "Where is the red square?"
HOST_SYNCS = ("cpu", "item", "tolist", "numpy")  # Tensor methods that wait for the device


def _params(preset, max_tokens):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args={"feather": preset})


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    engine = make_llm(tiny_checkpoint, block_size=32)
    yield engine
    shutdown(engine)


class _Probe:
    """Counts, during one engine step: device-to-host syncs made by
    feather_vllm code, the model's cutting forwards, and decode metadata
    builds."""

    def __init__(self, model, monkeypatch):
        self.syncs = 0
        self.cutting_forwards = 0
        self.builds = 0
        for name in HOST_SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                if "feather_vllm" in sys._getframe(1).f_code.co_filename:
                    self.syncs += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        original_forward = model._pruned_forward

        def pruned_forward(*args, **kwargs):
            self.cutting_forwards += 1
            return original_forward(*args, **kwargs)

        monkeypatch.setattr(model, "_pruned_forward", pruned_forward)
        from vllm.v1.worker.utils import AttentionGroup

        original_build = AttentionGroup.build_metadata

        def build_metadata(*args, **kwargs):
            self.builds += 1
            return original_build(*args, **kwargs)

        monkeypatch.setattr(AttentionGroup, "build_metadata", build_metadata)


def _decode_step_counts(llm, monkeypatch, presets: list[str]) -> _Probe:
    """Prefill one image request per preset (one per step), then count one
    decode step of the whole batch."""
    _, kv, model = engine_parts(llm)
    engine = llm.llm_engine
    image = sample_images()[1]
    for i, preset in enumerate(presets):
        # Long enough that the first is still decoding when the last is prefilled.
        engine.add_request(f"decode-{len(presets)}-{i}", image_prompt(image, QUESTION),
                           _params(preset, len(presets) + 4))
    scheduler = engine.engine_core.engine_core.scheduler
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.requests.values()):
        engine.step()
    assert len(scheduler.running) == len(presets)
    with monkeypatch.context() as patch:
        probe = _Probe(model, patch)
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    return probe


@pytest.mark.parametrize("batch", [1, 16], ids=["batch-1", "batch-16"])
def test_pruned_decode_runs_stock_forward_without_host_syncs(llm, monkeypatch, batch):
    probe = _decode_step_counts(llm, monkeypatch, ["feather"] * batch)
    assert probe.cutting_forwards == 0  # vLLM's own forward (compiled where vLLM compiles)
    assert probe.syncs == 0  # no .cpu()/.item()/.tolist() in feather_vllm code, whatever the batch
    # One metadata build per KV group, as unpruned: feather's cuts (8, 16)
    # are stage starts, so each pruned group is shifted before vLLM builds it.
    assert probe.builds == 8


def test_unpruned_decode_builds_as_vllm(llm, monkeypatch):
    probe = _decode_step_counts(llm, monkeypatch, ["none"] * 4)
    assert (probe.cutting_forwards, probe.syncs, probe.builds) == (0, 0, 8)


def test_mixed_cut_layers_partition_groups(llm, monkeypatch):
    """FastV cuts at 3, inside the group of layers [0, 4): layer 3 gets its
    own metadata there; PyramidDrop's cuts are group starts."""
    probe = _decode_step_counts(llm, monkeypatch, ["fastv", "pyramiddrop", "none"])
    # vLLM's 8 builds (groups [4, 8) .. [28, 32) shifted before theirs), and
    # one more for layer 3, after FastV's cut inside group [0, 4).
    assert probe.builds == 9 and probe.syncs == 0
