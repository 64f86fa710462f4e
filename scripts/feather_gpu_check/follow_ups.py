"""Check 6: follow-up turns under each preset's default policy."""

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
    from tests.reference_hf import kept_lists, reference_generate

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
        forced = {"kept": kept} if policy == "reuse" else {"also": kept}
        ref = reference_generate(model, torch.tensor([two.prompt_token_ids]), pixels, resolve(preset), MAX_TOKENS,
                                 **forced)
        got = kept_lists(second.stages)
        by = second.reused if policy == "reuse" else second.united  # what the report says turn 2 did
        tokens_equal = list(two.outputs[0].token_ids) == ref["token_ids"]
        from_turn1 = by is not None and by.kept_from == one.request_id
        figures[preset] = {"policy": policy, "turn2_prompt_tokens": len(two.prompt_token_ids),
                           "turn2_cached_tokens": two.num_cached_tokens, "tokens_equal": tokens_equal,
                           "kept_sets_equal": got == ref["kept"], "kept_from_turn1": from_turn1,
                           "kept_per_stage": [s.total for s in second.stages]}
        if not (tokens_equal and got == ref["kept"] and from_turn1):
            problems.append(f"{preset} ({policy}): {figures[preset]}")
    del model
    return {"ok": not problems, "dtype": "float32", "eager": True, "prefix_caching": True,
            "presets": figures, "error": "; ".join(problems) or None}
