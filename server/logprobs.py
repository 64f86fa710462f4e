"""Logprobs in the OpenAI shapes: clamped, per sampled token with its most
likely candidates (chat's `content` list; completions' parallel lists)."""

from __future__ import annotations

import math
from typing import Any

LOGPROB_FLOOR = -9999.0  # vLLM's floor for a logprob in the OpenAI shapes


def clamp_logprob(logprob: float) -> float:
    """-inf (a token the sampler ruled out) and NaN become `LOGPROB_FLOOR`:
    unclamped, they fail the plain answer's JSON (a 500) and are not JSON in
    a stream. Mirrors vLLM 0.32's `_clamp_logprob`
    (vllm/entrypoints/scale_out/token_in_token_out/serving.py). Its chat
    server (`OpenAIServingChat._create_chat_logprobs` and `_get_top_logprobs`,
    vllm/entrypoints/openai/chat_completion/serving.py) has the same floor,
    `max(logprob, -9999.0)`, but that leaves NaN as NaN."""
    return LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


def chat_logprobs(token_ids: Any, step_logprobs: Any, top_logprobs: int, tokenizer: Any,
                  as_token_ids: bool = False, return_all: bool = False) -> dict[str, Any]:
    """The OpenAI `logprobs` of one choice (plain or streamed chunk): per
    sampled token its logprob and its `top_logprobs` most likely
    candidates, every logprob clamped (`clamp_logprob`). As vLLM:
    `as_token_ids` (return_tokens_as_token_ids) names tokens `token_id:<id>`;
    `return_all` (logprob_token_ids) lists every candidate the engine
    returned, the asked ids, in its order."""
    def entry(tid: int, lp: Any) -> dict[str, Any]:
        if as_token_ids:
            text = f"token_id:{tid}"
        else:
            text = lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([tid])
        return {"token": text, "logprob": clamp_logprob(lp.logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, candidates in zip(token_ids, step_logprobs):
        if return_all:
            top = list(candidates.items())
        else:
            top = sorted(candidates.items(), key=lambda kv: kv[1].rank)[:top_logprobs]
        content.append({**entry(token_id, candidates[token_id]), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return {"content": content}


def _token_text(tid: int, lp: Any, tokenizer: Any, as_token_ids: bool) -> str:
    if as_token_ids:
        return f"token_id:{tid}"
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode([tid])


def completion_logprobs(token_ids: Any, step_logprobs: Any, top: int, tokenizer: Any, as_token_ids: bool = False,
                        return_all: bool = False, initial_offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` (parallel lists: `tokens`,
    `token_logprobs`, `top_logprobs`, `text_offset`), as vLLM's
    `OpenAIServingCompletion._create_completion_logprobs`: a step without
    logprobs (the first prompt token when echoed) is None; each step's
    candidates in the engine's order (the sampled token first), `top` + 1
    of them (OpenAI's rule) unless `return_all` (logprob_token_ids) or -1;
    every logprob clamped."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, candidates in zip(token_ids, step_logprobs):
        if candidates is None:
            text = _token_text(tid, None, tokenizer, as_token_ids)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            text = _token_text(tid, candidates[tid], tokenizer, as_token_ids)
            token_logprobs.append(clamp_logprob(candidates[tid].logprob))
            top_logprobs.append({_token_text(t, lp, tokenizer, as_token_ids): clamp_logprob(lp.logprob)
                                 for i, (t, lp) in enumerate(candidates.items())
                                 if return_all or top == -1 or top >= i})
        offsets.append(offsets[-1] + len(tokens[-1]) if offsets else initial_offset)
        tokens.append(text)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}


def prompt_logprobs(steps: Any) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs` field: per prompt token None (the first) or
    {token id: {logprob, rank, decoded_token}}, logprobs clamped."""
    if steps is None:
        return None
    return [None if step is None else {str(t): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
                                                "decoded_token": lp.decoded_token} for t, lp in step.items()}
            for step in steps]
