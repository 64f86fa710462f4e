"""What each follow-up policy answers, by the transformers reference, on
held-out two-object scenes: reuse, reselect, keep_both and add_back (reuse
turn 1's pruned KV, add the new question's top dropped tokens;
docs/multi_turn_reuse.md, "Add back"). The reference inserts the added
tokens after the whole history, the engine where its cache hit ends.

    .venv/bin/python scripts/add_back_accuracy.py --model feather_vllm/demo/weights_two_object \\
        [--presets fastv,pyramiddrop] [--scenes 200] [--json out.json]

Turn 1 asks where one object is (greedy, pruned by the preset); turn 2,
rendered by the checkpoint's chat template with turn 1's reply in the
history, asks where the other is. Turn 2 under each policy, from the same
turn 1, fp32, greedy: accuracy ± one standard error and the difference to
reselect paired per scene. Add back adds as many tokens as the first cut
keeps (FastV: 144 of 576). No vLLM: tests/reference_hf.py computes every
policy (reuse: turn 1's kept sets forced; keep_both: each stage keeps turn
1's kept set too; add back: `reference_add_back`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("reuse", "reselect", "keep_both", "add_back")
MAX_TOKENS = 8


def _chat(processor, turns: list[tuple[str, str]], question: str) -> str:
    """The chat template's text of (question, reply) turns, then `question`."""
    messages: list[dict[str, Any]] = []
    for i, (asked, reply) in enumerate(turns):
        content = [{"type": "text", "text": asked}]
        messages += [{"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + content},
                     {"role": "assistant", "content": reply}]
    content = [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": ([{"type": "image"}] if not turns else []) + content})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def scene_answers(processor, model, pair, preset: str) -> dict[str, str]:
    """Turn 2's reply under each policy (and "none": unpruned), after one turn 1."""
    from feather_vllm.pruning.config import PRESETS
    from feather_vllm.pruning.selection import stage_keep_count
    from tests.reference_hf import reference_add_back, reference_generate

    config, none = PRESETS[preset], PRESETS["none"]
    first, second = pair.objects
    decode = processor.tokenizer.decode
    one = processor(images=pair.image, text=_chat(processor, [], first.question), return_tensors="pt")
    turn_1 = reference_generate(model, one["input_ids"], one["pixel_values"], config, MAX_TOKENS)
    reply = decode(turn_1["token_ids"], skip_special_tokens=True).strip()
    two = processor(images=pair.image, text=_chat(processor, [(first.question, reply)], second.question),
                    return_tensors="pt")
    ids, pixels, history_end = two["input_ids"], two["pixel_values"], one["input_ids"].shape[1]
    if not bool((ids[0, :history_end] == one["input_ids"][0]).all()):
        raise AssertionError("turn 2's prompt does not begin with turn 1's")
    kept = turn_1["kept"]
    added = stage_keep_count(int((ids == model.config.image_token_index).sum()), config.stages[0])
    runs = {
        "none": reference_generate(model, ids, pixels, none, MAX_TOKENS),
        "reuse": reference_generate(model, ids, pixels, config, MAX_TOKENS, kept=kept),
        "reselect": reference_generate(model, ids, pixels, config, MAX_TOKENS),
        "keep_both": reference_generate(model, ids, pixels, config, MAX_TOKENS, also=kept),
        "add_back": reference_add_back(model, ids, pixels, config, MAX_TOKENS, kept, history_end, add=added),
    }
    return {name: decode(run["token_ids"], skip_special_tokens=True) for name, run in runs.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="scripts/add_back_accuracy.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a two-object demo checkpoint")
    parser.add_argument("--presets", default="fastv,pyramiddrop")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--pair-seed", type=int, default=54321)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests.reference_hf
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from feather_vllm.tools.demo.scenes import held_out_pairs
    from feather_vllm.tools.evaluate import _mean_se, parse_cell

    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    pairs = held_out_pairs(args.scenes, args.pair_seed)
    report: dict[str, Any] = {}
    for preset in args.presets.split(","):
        correct: dict[str, list[float]] = {}
        for pair in tqdm(pairs, desc=preset, unit="scene"):
            for name, reply in scene_answers(processor, model, pair, preset).items():
                correct.setdefault(name, []).append(float(parse_cell(reply) == pair.objects[1].cell))
        report[preset] = {}
        for name, values in correct.items():
            acc, se = _mean_se(values)
            entry: dict[str, Any] = {"accuracy": acc, "se": se, "n": len(values)}
            if name in POLICIES and name != "reselect":
                diff, diff_se = _mean_se([a - b for a, b in zip(values, correct["reselect"])])
                entry["vs_reselect"] = {"difference": diff, "se": diff_se}
            report[preset][name] = entry
            vs = entry.get("vs_reselect")
            print(f"{preset:<12} {name:<10} turn 2 {100 * acc:5.1f} ± {100 * se:4.1f}%"
                  + ("" if vs is None else f"   vs reselect {100 * vs['difference']:+5.1f} ± {100 * vs['se']:4.1f}"))
    result = {"model": args.model, "scenes": args.scenes, "pair_seed": args.pair_seed, "report": report}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
