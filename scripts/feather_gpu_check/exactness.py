"""Checks 1-3, on one stock and one FEATHER engine (fp32, eager): unpruned
exactness, kept sets against the reference, KV blocks per group."""

from __future__ import annotations

import math
from typing import Any

from feather_gpu_check.common import (
    KV_MAX_TOKENS,
    LOGPROB_TOL,
    MAX_TOKENS,
    PRUNED,
    QUESTION,
    chat,
    params,
    reference_model,
)


def greedy(llm, preset: str | None, device: str) -> list[tuple[list[int], list[float], list[int]]]:
    """Greedy tokens, their logprobs and the prompt tokens of 3 images x 2
    questions (tests/test_unpruned_exactness.py); on cpu one question each."""
    from tests.helpers import PROMPTS, sample_images

    convs = [chat(img, p) for img in sample_images() for p in (PROMPTS if device == "cuda" else PROMPTS[:1])]
    outs = llm.chat(convs, params(preset, MAX_TOKENS, logprobs=0), use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
             list(o.prompt_token_ids)) for o in outs]


def unpruned_figures(stock: dict[str, Any], feather: dict[str, Any]) -> dict[str, Any]:
    from feather_vllm import ARCHITECTURE

    s_out, f_out = stock["outputs"], feather["outputs"]
    equal = len(s_out) == len(f_out) > 0
    compared, diff, prompts_equal = 0, 0.0, True
    for (s_tok, s_lp, s_prompt), (f_tok, f_lp, f_prompt) in zip(s_out, f_out):
        prompts_equal &= s_prompt == f_prompt
        equal &= s_tok == f_tok and len(s_tok) == MAX_TOKENS
        compared += min(len(s_tok), len(f_tok))
        diff = max([diff, *(abs(a - b) for a, b in zip(s_lp, f_lp))])
    ok = (equal and prompts_equal and compared > 0 and diff <= LOGPROB_TOL
          and stock["architecture"] == "LlavaForConditionalGeneration"
          and feather["architecture"] == ARCHITECTURE)
    error = None
    if not ok:
        error = (f"stock {stock['architecture']} vs {feather['architecture']} (preset none): "
                 f"tokens equal {equal}, prompts equal {prompts_equal}, max |logprob diff| {diff:.3g} "
                 f"(tolerance {LOGPROB_TOL})")
    return {"ok": ok, "prompts": len(f_out), "tokens_compared": compared, "tokens_equal": equal,
            "max_abs_logprob_diff": diff, "tolerance": LOGPROB_TOL, "dtype": "float32", "eager": True,
            "stock_architecture": stock["architecture"], "feather_architecture": feather["architecture"],
            "attention_backend": feather["backend"], "error": error}


def kept_sets(llm) -> dict[str, Any]:
    """One mixed batch (every preset on every case, unpruned ones included);
    the transformers reference on the same prompts."""
    from feather_vllm.kv.plan import report_of
    from feather_vllm.pruning.config import resolve
    from tests.helpers import sample_images
    from tests.reference_hf import kept_lists, reference_generate

    cases = [(img, QUESTION) for img in sample_images()]
    presets = ["none", *PRUNED]
    convs = [chat(img, q) for _ in presets for img, q in cases]
    sampling = [params(p, 1) for p in presets for _ in cases]
    outs = llm.chat(convs, sampling, use_tqdm=False)
    engine = {p: [report_of(o) for o in outs[i * len(cases):(i + 1) * len(cases)]] for i, p in enumerate(presets)}

    processor, model = reference_model(llm.llm_engine.vllm_config.model_config.model)
    figures: dict[str, Any] = {}
    ok = all(r is not None and r.stages == () and r.fallback is None for r in engine["none"])
    problems = [] if ok else ["preset none pruned or fell back"]
    for preset in PRUNED:
        config = resolve(preset)
        compared, equal, counts, mismatches = 0, 0, [], []
        for case, (img, q), report in zip(range(len(cases)), cases, engine[preset]):
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True)
            inputs = processor(images=img, text=text, return_tensors="pt")
            ref = reference_generate(model, inputs["input_ids"], inputs["pixel_values"], config, 1)["kept"]
            if report is None or report.fallback is not None:
                mismatches.append({"case": case, "fallback": None if report is None else report.fallback.value})
                compared += len(ref)
                continue
            got = kept_lists(report.stages)
            layers_ok = [stage.layer for stage in report.stages] == list(config.cut_layers)
            counts.append([stage.total for stage in report.stages])
            for stage_index, ref_stage in enumerate(ref):
                compared += 1
                got_stage = got[stage_index] if stage_index < len(got) else None
                if layers_ok and got_stage == ref_stage:
                    equal += 1
                else:
                    flat_got = {i for k in (got_stage or []) for i in k}
                    flat_ref = {i for k in ref_stage for i in k}
                    mismatches.append({"case": case, "stage": stage_index,
                                       "engine_only": len(flat_got - flat_ref),
                                       "reference_only": len(flat_ref - flat_got)})
        figures[preset] = {"sets_compared": compared, "sets_equal": equal, "cut_layers": list(config.cut_layers),
                           "kept_per_case": counts, "mismatches": mismatches[:10]}
        if compared == 0 or equal != compared:
            ok = False
            problems.append(f"{preset}: {equal}/{compared} kept sets equal the reference")
    del model
    return {"ok": ok, "cases": len(cases), "presets": figures,
            "sets_compared": {p: figures[p]["sets_compared"] for p in PRUNED},
            "error": "; ".join(problems) or None}


def predicted_blocks(kv, cuts: list[tuple[int, int]], tokens: int, image_tokens: int) -> list[int]:
    """Per KV group, blocks for `tokens` minus the image tokens absent from
    the group's first layer, given `cuts` ((layer, image tokens kept) per
    cut, as the engine's report has them: reservations are trimmed to what
    the cut kept)."""
    out = []
    for group in kv.kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        kept = [k for layer, k in cuts if layer <= spec.feather_first_layer]
        dropped = image_tokens - kept[-1] if kept else 0
        out.append(math.ceil((tokens - dropped) / spec.block_size))
    return out


def kv_blocks(llm) -> dict[str, Any]:
    from feather_vllm.kv.plan import report_of
    from tests.helpers import sample_images

    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    free_before = kv.block_pool.get_num_free_blocks()
    (out,) = llm.chat([chat(sample_images()[1], QUESTION)], params("feather", KV_MAX_TOKENS), use_tqdm=False)
    report = report_of(out)
    if report is None:
        return {"ok": False, "error": "no pruning report on the finished output"}
    tokens = len(out.prompt_token_ids) + KV_MAX_TOKENS - 1  # the last token is sampled, never cached
    image_tokens = report.image_tokens_total
    expected = predicted_blocks(kv, [(stage.layer, stage.total) for stage in report.stages], tokens, image_tokens)
    unpruned = predicted_blocks(kv, [], tokens, image_tokens)
    held, reported_unpruned = list(report.kv_blocks_held), list(report.kv_blocks_unpruned)
    freed = kv.block_pool.get_num_free_blocks() == free_before
    ok = report.fallback is None and held == expected and reported_unpruned == unpruned and sum(held) < sum(unpruned)
    error = None
    if not ok:
        error = (f"held {held} (expected {expected}), unpruned {reported_unpruned} (expected {unpruned}), "
                 f"fallback {report.fallback}")
    return {"ok": ok, "preset": "feather", "prompt_tokens": len(out.prompt_token_ids),
            "image_tokens": image_tokens, "generated_tokens": KV_MAX_TOKENS,
            "block_size": kv.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
            "kv_groups": len(kv.kv_cache_config.kv_cache_groups),
            "kept_per_stage": [stage.total for stage in report.stages],
            "held_per_group": held, "expected_per_group": expected,
            "unpruned_per_group": reported_unpruned, "held_total": sum(held), "unpruned_total": sum(unpruned),
            "ratio": round(sum(held) / sum(unpruned), 4) if sum(unpruned) else None,
            "blocks_freed_at_finish": freed, "error": error}
