"""The shipped demo model: loads as it ships, localizes well above chance
through the real engine, and is reproducible from its training command."""

from __future__ import annotations

import pytest

from feather_vllm.demo import WEIGHTS_DIR
from feather_vllm.demo.scenes import CELLS, held_out, make_scene
from feather_vllm.evaluate import parse_cell

needs_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "model.safetensors").exists(),
                                   reason="demo weights not trained yet")


@pytest.fixture(scope="module")
def answers():
    """Greedy answers of the shipped model on 90 held-out scenes, per preset."""
    from vllm import SamplingParams

    from tests.helpers import chat, make_llm, shutdown

    scenes = held_out(90)
    llm = make_llm(WEIGHTS_DIR)
    try:
        out = {}
        for preset in ("none", "feather"):
            params = SamplingParams(max_tokens=4, temperature=0.0, extra_args={"feather": preset})
            results = llm.chat([chat(s.image, s.question) for s in scenes], params, use_tqdm=False)
            out[preset] = [r.outputs[0].text for r in results]
        return scenes, out
    finally:
        shutdown(llm)


@needs_weights
def test_unpruned_answers_are_cells_and_well_above_chance(answers):
    scenes, out = answers
    parsed = [parse_cell(text) for text in out["none"]]
    assert all(text.strip() in CELLS for text in out["none"]), out["none"][:5]  # one readable word, then EOS
    accuracy = sum(p == s.cell for p, s in zip(parsed, scenes)) / len(scenes)
    assert accuracy >= 0.8, accuracy  # chance is 1/9; the README reports the full evaluation


@needs_weights
def test_pruned_answers_stay_readable(answers):
    _, out = answers
    assert sum(parse_cell(text) is not None for text in out["feather"]) >= 0.9 * len(out["feather"])


def test_scenes_label_the_cell_of_the_centre():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = make_scene(rng)
        x, y = scene.centre
        row, col = scene.cell // 3, scene.cell % 3
        assert col * 112 + 7 <= x <= (col + 1) * 112 - 7 and row * 112 + 7 <= y <= (row + 1) * 112 - 7
        assert scene.question.startswith("Where is the ") and scene.answer == CELLS[scene.cell]


def test_training_is_reproducible_from_a_seed(tmp_path):
    from safetensors.torch import load_file

    from feather_vllm.demo.train import train

    for name in ("a", "b"):
        train(tmp_path / name, steps=2, seed=3, pruning_aware=True, threads=1, batch_size=2)
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tmp_path / "a" / "tokenizer.json").exists() and (tmp_path / "a" / "processor_config.json").exists()
