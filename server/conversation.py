"""Chat messages as vLLM's chat renderer takes them, images loaded and
checked by the gateway's own loader (server/images.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from server.deps import check_unknown_fields
from server.errors import APIError
from server.state import GatewayState


def check_messages(messages: list[Any], state: GatewayState) -> None:
    """Message keys the gateway does not know: 400 naming the first
    (`messages[i].<key>`) unless --lenient-fields; tool fields where they
    belong (vLLM's chat parser reads `tool_calls` of assistant messages and
    `tool_call_id` of tool messages only)."""
    for m, message in enumerate(messages):
        check_unknown_fields(message.model_extra, state, "message ", prefix=f"messages[{m}].")
        if message.tool_calls is not None and message.role != "assistant":
            raise APIError(400, "tool_calls are only accepted in assistant messages", param=f"messages[{m}].tool_calls")
        if message.tool_call_id is not None and message.role != "tool":
            raise APIError(400, "tool_call_id is only accepted in tool messages", param=f"messages[{m}].tool_call_id")
        if message.role == "tool" and message.tool_call_id is None:
            raise APIError(400, "a tool message needs the tool_call_id of the call it answers",
                           param=f"messages[{m}].tool_call_id")


def refuse_special_text(state: GatewayState, value: Any, path: str) -> None:
    """Like `GatewayState.refuse_special_tokens`, for any other text that
    reaches the chat template (tool definitions and calls, names, template
    kwargs): a string spelling a special token (the image placeholder,
    BOS/EOS) is refused with 400 naming where it is."""
    if state.special_text is None or value is None:
        return
    if isinstance(value, str):
        found = state.special_text.search(value)
        if found:
            raise APIError(400, f"{path}: text contains the special token {found.group()!r}", param=path,
                           code="special_token_in_text")
    elif isinstance(value, dict):
        for key, sub in value.items():
            refuse_special_text(state, str(key), f"{path}.{key}")
            refuse_special_text(state, sub, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, sub in enumerate(value):
            refuse_special_text(state, sub, f"{path}[{i}]")


def refuse_special_in_messages(state: GatewayState, messages: list[Any]) -> None:
    """`refuse_special_text` for what messages bring to the template besides
    their content (checked by `GatewayState.refuse_special_tokens`)."""
    for m, message in enumerate(messages):
        extra = message.model_dump(include={"name", "tool_calls", "tool_call_id"}, exclude_none=True)
        refuse_special_text(state, extra, f"messages[{m}]")


async def conversation(messages: list[Any], state: GatewayState) -> list[dict[str, Any]]:
    """`messages` (server.schemas.Message) for vLLM's chat renderer, images
    loaded and checked here (count limit before any fetch)."""
    images: list[tuple[int, int, str]] = []
    for m, message in enumerate(messages):
        if isinstance(message.content, list):
            for p, part in enumerate(message.content):
                if part.type == "image_url":
                    if message.role != "user":
                        raise APIError(400, "images are only accepted in user messages",
                                       param=f"messages[{m}].content[{p}]")
                    images.append((m, p, part.image_url.url))
    limit = state.layout.max_images_per_prompt  # the engine's (--limit-mm-per-prompt): refused before any fetch
    if len(images) > limit:
        raise APIError(400, f"{len(images)} images in the request; this server accepts at most {limit}",
                       param="messages", code="too_many_images")
    loaded = await asyncio.gather(*(state.images.load(url, f"messages[{m}].content[{p}].image_url.url")
                                    for m, p, url in images))
    by_position = {(m, p): img for (m, p, _), img in zip(images, loaded)}
    out = []
    for m, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        # vLLM's chat parser passes these on to the template (tool_calls' arguments as dicts).
        extra = {"name": message.name, "tool_call_id": message.tool_call_id,
                 "tool_calls": [c.model_dump() for c in message.tool_calls] if message.tool_calls else None}
        extra = {k: v for k, v in extra.items() if v is not None}
        if message.content is None or isinstance(message.content, str):
            out.append({"role": role, "content": message.content or "", **extra})
            continue
        parts = []
        for p, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image_pil", "image_pil": by_position[(m, p)]})
        if role != "user":  # the template reads plain text for these roles
            out.append({"role": role, "content": "".join(x.get("text", "") for x in parts), **extra})
        else:
            out.append({"role": role, "content": parts, **extra})
    return out


def image_sizes(messages: list[dict[str, Any]]) -> tuple[tuple[int, int], ...]:
    """(height, width) of each image that `conversation` loaded, in prompt
    order: what an anyres model's image-token layout depends on."""
    return tuple((part["image_pil"].height, part["image_pil"].width) for message in messages
                 if isinstance(message["content"], list) for part in message["content"] if "image_pil" in part)


# What a request's chat_template_kwargs may not set, and why. vLLM lets a few
# of these through (`tools`, `documents`) or overrides them silently
# (`add_generation_prompt`); the gateway says so with a 400.
RESERVED_TEMPLATE_KWARGS = {
    **dict.fromkeys(("add_generation_prompt", "continue_final_message", "tools", "documents"),
                    "set by the request field of that name"),
    **dict.fromkeys(("messages", "conversation"), "the messages are the request's `messages`"),
    **dict.fromkeys(("chat_template", "tokenize", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"),
                    "a parameter of the renderer, not a template variable"),
}


def check_template_kwargs(kwargs: dict[str, Any] | None, state: GatewayState) -> None:
    """A request's chat_template_kwargs, passed to the chat template as vLLM
    does, unless they could change the prompt's image placeholders: the
    template's special tokens (`bos_token`, `eos_token`...: the image
    placeholder could be set in their place) and special-token text in any
    value are refused, as are `RESERVED_TEMPLATE_KWARGS`."""
    for key in kwargs or {}:
        reason = RESERVED_TEMPLATE_KWARGS.get(key)
        if reason is None and (key.endswith("_token") or key.endswith("_tokens")):
            reason = "the template's special tokens come from the tokenizer (the image placeholder among them)"
        if reason:
            raise APIError(400, f"chat_template_kwargs.{key} is not accepted: {reason}",
                           param=f"chat_template_kwargs.{key}", code="unsupported_parameter")
    refuse_special_text(state, kwargs, "chat_template_kwargs")


def check_template_input(state: GatewayState, messages: list[Any], template_kwargs: dict[str, Any] | None,
                         tools: Any) -> None:
    """Everything a request brings to the chat template, checked before it
    renders (chat completions and /tokenize alike): the messages, the
    template kwargs, and no special-token text in message contents, in what
    messages add besides them, or in the tools."""
    check_messages(messages, state)
    check_template_kwargs(template_kwargs, state)
    state.refuse_special_tokens(messages)
    refuse_special_in_messages(state, messages)
    refuse_special_text(state, tools, "tools")
