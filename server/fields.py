"""What the gateway does with each field of a chat completion request.

Every field of vLLM 0.32's `ChatCompletionRequest`
(vllm/entrypoints/openai/chat_completion/protocol.py) and the OpenAI fields
vLLM lacks is listed here with its status, and nothing is silently dropped:

- `HONOURED`: the field does what it does in vLLM (sampling fields through
  vLLM's own `ChatCompletionRequest.to_sampling_params`, prompt fields
  through its `build_tok_params` and chat renderer);
- `NO_EFFECT`: accepted, and changes nothing here (as in vLLM, or the field
  has no server-side meaning);
- `REFUSED`: answered 400 naming the field when set to anything but its
  default (the default itself is accepted: clients send `use_beam_search: false`).

Fields in none of these are unknown: 400 naming the field, or, with
`--lenient-fields`, ignored with a warning (vLLM's behaviour).
`tests/test_server_fields.py` checks that every field of the installed
vLLM's request is classified, and the README's table is this one.
"""

from __future__ import annotations

from typing import Any

HONOURED = "honoured"
NO_EFFECT = "accepted, no effect"
REFUSED = "refused (400)"

# field -> (status, note). Notes are the README's.
FIELDS: dict[str, tuple[str, str]] = {
    # OpenAI's fields, in vLLM's order
    "messages": (HONOURED, "text and `image_url` parts; roles system/developer/user/assistant/tool, an "
                 "assistant's `tool_calls`, a tool message's `tool_call_id`; unknown keys 400 unless lenient"),
    "model": (HONOURED, "must be the served name (404 otherwise)"),
    "frequency_penalty": (HONOURED, ""),
    "logit_bias": (HONOURED, "token ids (as strings) -> bias, checked against the vocabulary"),
    "logprobs": (HONOURED, ""),
    "top_logprobs": (HONOURED, "0-20; needs `logprobs: true`"),
    "max_tokens": (HONOURED, "deprecated alias of `max_completion_tokens`"),
    "max_completion_tokens": (HONOURED, "default: the rest of the context (or the model's generation config)"),
    "n": (HONOURED, "1-8; n > 1 needs sampling"),
    "presence_penalty": (HONOURED, ""),
    "response_format": (HONOURED, "`text`, `json_object`, `json_schema`, `structural_tag` (vLLM's structured "
                        "outputs, xgrammar)"),
    "seed": (HONOURED, ""),
    "stop": (HONOURED, "at most 16 strings"),
    "stream": (HONOURED, ""),
    "stream_options": (HONOURED, "`include_usage`; only with `stream: true` (as vLLM)"),
    "temperature": (HONOURED, "0-2"),
    "top_p": (HONOURED, ""),
    "tools": (HONOURED, "function tools, rendered by the chat template; calls parsed by vLLM's "
              "`--tool-call-parser` (with `--enable-auto-tool-choice`, as vLLM); 400 without them"),
    "tool_choice": (HONOURED, "`auto`, `none`, `required`, named function; `required` and named forced by vLLM's "
                    "structured outputs (structural tags where the parser has them)"),
    "reasoning_effort": (REFUSED, "no reasoning parser; it would change the chat template's kwargs"),
    "thinking_token_budget": (REFUSED, "needs vLLM's reasoning config"),
    "include_reasoning": (NO_EFFECT, "no reasoning parser: there is no reasoning to include or hide (as vLLM "
                          "without `--reasoning-parser`)"),
    "parallel_tool_calls": (HONOURED, "`false`: at most one call (in the grammar where the parser has "
                            "structural tags, and in the answer)"),
    "user": (NO_EFFECT, "ignored by vLLM too"),
    # vLLM's sampling parameters
    "use_beam_search": (REFUSED, "beam search is not served"),
    "top_k": (HONOURED, ""),
    "min_p": (HONOURED, ""),
    "repetition_penalty": (HONOURED, ""),
    "watermarking": (HONOURED, "applies the engine's watermark config (none by default, then no effect)"),
    "length_penalty": (REFUSED, "only used by beam search, which is refused"),
    "stop_token_ids": (HONOURED, ""),
    "include_stop_str_in_output": (HONOURED, ""),
    "ignore_eos": (HONOURED, ""),
    "min_tokens": (HONOURED, ""),
    "skip_special_tokens": (HONOURED, ""),
    "spaces_between_special_tokens": (HONOURED, ""),
    "truncate_prompt_tokens": (HONOURED, "vLLM's renderer; a limit that would cut an image is refused"),
    "truncation_side": (HONOURED, ""),
    "prompt_logprobs": (REFUSED, "pruned image tokens have no final-layer logits"),
    "logprob_token_ids": (HONOURED, "needs `logprobs: true`"),
    "allowed_token_ids": (HONOURED, ""),
    "bad_words": (HONOURED, ""),
    # vLLM's extra parameters
    "echo": (HONOURED, "the last message's text when it has the answer's role (with "
             "`continue_final_message`); no prompt logprobs (400 with `top_logprobs`)"),
    "add_generation_prompt": (HONOURED, ""),
    "continue_final_message": (HONOURED, "needs `add_generation_prompt: false`"),
    "add_special_tokens": (HONOURED, ""),
    "documents": (REFUSED, "chat template input the special-token check does not cover"),
    "chat_template": (REFUSED, "request templates are untrusted (vLLM refuses them too unless "
                      "`--trust-request-chat-template`)"),
    "chat_template_kwargs": (HONOURED, "passed to the chat template; 400 for the template's special tokens "
                             "(`*_token`), special-token text in values, and keys that request fields set "
                             "(`tools`, `documents`, `add_generation_prompt`...)"),
    "media_io_kwargs": (REFUSED, "images are loaded by the gateway's own checked loader"),
    "mm_processor_kwargs": (REFUSED, "would change the image token count the pruning plan is built on"),
    "structured_outputs": (HONOURED, "`json`, `regex`, `choice`, `grammar`, `structural_tag` (xgrammar); "
                           "`disable_any_whitespace`, `disable_additional_properties` and `whitespace_pattern` "
                           "refused: vLLM's backends read them from `--structured-outputs-config` only"),
    "priority": (HONOURED, "takes effect with `--scheduling-policy priority` (vLLM's engine flag)"),
    "request_id": (HONOURED, "the response's id is `chatcmpl-<request_id>`; the engine runs it under a "
                   "unique id"),
    "session_id": (HONOURED, "passed to the engine (KV events)"),
    "return_tokens_as_token_ids": (HONOURED, "logprob tokens as `token_id:<id>`"),
    "return_token_ids": (HONOURED, "`prompt_token_ids` (image placeholders expanded, as the engine ran it) and "
                         "each choice's `token_ids`; streamed: the first chunk and each delta"),
    "routed_experts_prompt_start": (NO_EFFECT, "MoE routing replay only; passed to the engine, which checks it"),
    "return_token_offsets": (NO_EFFECT, "vLLM honours it only on its render endpoints"),
    "return_prompt_text": (HONOURED, "`prompt_text`: the engine's prompt text (each image placeholder "
                           "repeated for the image's tokens, as in vLLM)"),
    "mm_payload": (NO_EFFECT, "vLLM honours it only on its render endpoints"),
    "return_mm_kwargs": (NO_EFFECT, "deprecated alias of `mm_payload`"),
    "cache_salt": (HONOURED, "vLLM's prefix-cache salt; with API keys combined with a per-key salt"),
    "kv_transfer_params": (REFUSED, "KV connectors are refused by the pruning engine"),
    "ec_transfer_params": (REFUSED, "encoder-cache transfer is not served"),
    "vllm_xargs": (REFUSED, "custom extension arguments: the gateway's own (`feather`) travel there"),
    "repetition_detection": (HONOURED, ""),
    "stream_interval": (HONOURED, "tokens per streamed chunk (at least the engine's `--stream-interval`)"),
}

# OpenAI fields that vLLM's request does not have, and the gateway's own.
GATEWAY_FIELDS: dict[str, tuple[str, str]] = {
    "feather": (HONOURED, "the gateway's pruning settings (see above)"),
    "metadata": (NO_EFFECT, "OpenAI's stored-completion metadata; nothing is stored"),
    "store": (NO_EFFECT, "nothing is stored"),
    "service_tier": (NO_EFFECT, "one tier"),
    "functions": (REFUSED, "deprecated OpenAI tools"),
    "function_call": (REFUSED, "deprecated OpenAI tools"),
    "audio": (REFUSED, "no audio output"),
    "prediction": (REFUSED, "no predicted outputs"),
}

ALL_FIELDS = {**FIELDS, **GATEWAY_FIELDS}


def is_default(name: str, value: Any) -> bool:
    """Whether a refused field carries its default (accepted) value."""
    if name == "tool_choice":
        return value in (None, "none")
    if name == "length_penalty":
        return value == 1.0
    if name in ("use_beam_search", "echo"):
        return value is False
    return value is None or value == [] or value == {}


# Options of `structured_outputs` that vLLM 0.32 accepts on a request but its
# backends read only from the engine's --structured-outputs-config.
ENGINE_WIDE_STRUCTURED_OUTPUTS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")


def refused_structured_option(structured_outputs: dict[str, Any] | None) -> str | None:
    """`structured_outputs.<option>` for the first engine-wide option the request sets."""
    for option in ENGINE_WIDE_STRUCTURED_OUTPUTS:
        if (structured_outputs or {}).get(option) not in (None, False):
            return f"structured_outputs.{option}"
    return None


def refused_field(fields_set: set[str], body: Any) -> str | None:
    """The first refused field the request sets to a non-default value."""
    for name, (status, _) in ALL_FIELDS.items():
        if status == REFUSED and name in fields_set and not is_default(name, getattr(body, name)):
            return name
    return None


def readme_table() -> str:
    """The README's table: every field with its status."""
    rows = ["| field | status | notes |", "|---|---|---|"]
    for name, (status, note) in ALL_FIELDS.items():
        rows.append(f"| `{name}` | {status} | {note} |")
    return "\n".join(rows)
