"""Check 6: follow-up turns under each policy that takes turn 1's selection."""

from __future__ import annotations

from typing import Any

from feather_gpu_check.common import (
    FOLLOW_UP,
    FOLLOW_UP_POLICIES,
    MAX_TOKENS,
    QUESTION,
    Run,
    chat,
    new_llm,
    params,
    reference_model,
    shutdown,
)


def follow_up_turns(run: Run) -> dict[str, Any]:
    import torch
    from PIL import ImageOps

    from feather_vllm.kv.plan import report_of
    from feather_vllm.pruning.config import resolve
    from tests.helpers import sample_images
    from tests.reference_hf import kept_lists, reference_add_back, reference_generate

    llm = new_llm(run.exact_kwargs(prefix_caching=True))
    try:
        image = ImageOps.flip(sample_images()[1])  # an image no earlier request sent
        turns = {}
        for preset, policy in FOLLOW_UP_POLICIES.items():
            setting = {"preset": preset, "follow_up": policy}
            first = chat(image, QUESTION)
            (one,) = llm.chat([first], params(setting, MAX_TOKENS), use_tqdm=False)
            history = [*first, {"role": "assistant", "content": one.outputs[0].text},
                       {"role": "user", "content": FOLLOW_UP}]
            (two,) = llm.chat([history], params(setting, MAX_TOKENS), use_tqdm=False)
            turns[preset] = (one, two)
    finally:
        shutdown(llm)
        run.release()
    processor, model = reference_model(run.checkpoint("tiny"))
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    figures: dict[str, Any] = {}
    problems = []
    for preset, policy in FOLLOW_UP_POLICIES.items():
        one, two = turns[preset]
        first, second = report_of(one), report_of(two)
        kept = kept_lists(first.stages)
        ids = torch.tensor([two.prompt_token_ids])
        if policy == "add_back":
            added = second.reused.added if second.reused else 0
            ref = reference_add_back(model, ids, pixels, resolve(preset), MAX_TOKENS, kept,
                                     second.reused.tokens if second.reused else 0, added)
        else:
            forced = {"kept": kept} if policy == "reuse" else {"also": kept}
            ref = reference_generate(model, ids, pixels, resolve(preset), MAX_TOKENS, **forced)
        got = kept_lists(second.stages)
        by = second.united if policy == "keep_both" else second.reused  # what the report says turn 2 did
        tokens_equal = list(two.outputs[0].token_ids) == ref["token_ids"]
        from_turn1 = by is not None and by.kept_from == one.request_id
        figures[preset] = {"policy": policy, "turn2_prompt_tokens": len(two.prompt_token_ids),
                           "turn2_cached_tokens": two.num_cached_tokens, "tokens_equal": tokens_equal,
                           "kept_sets_equal": got == ref["kept"], "kept_from_turn1": from_turn1,
                           "kept_per_stage": [s.total for s in second.stages],
                           "added": second.reused.added if second.reused else 0}
        if not (tokens_equal and got == ref["kept"] and from_turn1):
            problems.append(f"{preset} ({policy}): {figures[preset]}")
    del model
    return {"ok": not problems, "dtype": "float32", "eager": True, "prefix_caching": True,
            "presets": figures, "error": "; ".join(problems) or None}
