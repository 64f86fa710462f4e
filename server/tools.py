"""Tool calling with vLLM's own machinery: its parser classes
(`ParserManager`, the `--tool-call-parser` registry), the chat template's
`tools` argument, its `adjust_request` (structured outputs or structural
tags that force `required` and named calls), and the message and
finish-reason rules of its chat server
(vllm/entrypoints/openai/chat_completion/serving.py, vllm/renderers/online_renderer.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.errors import APIError


def check_flags(enable_auto_tool_choice: bool, tool_call_parser: str | None, tool_parser_plugin: str) -> str | None:
    """What vLLM's `serve` says of its tool flags at start (None: fine). Imports the plugin."""
    from vllm.tool_parsers import ToolParserManager

    if enable_auto_tool_choice and not tool_call_parser:
        return "--enable-auto-tool-choice requires --tool-call-parser"
    if tool_parser_plugin and len(tool_parser_plugin) > 3:  # vLLM's own test (api_server.py)
        ToolParserManager.import_tool_parser(tool_parser_plugin)
    valid = ToolParserManager.list_registered()
    if tool_call_parser and tool_call_parser not in valid:
        return f"invalid tool call parser: {tool_call_parser} (choose from {{{','.join(valid)}}})"
    return None


def parser_class(settings: Any, model_config: Any, tokenizer: Any) -> Any:
    """vLLM's parser class for the server's tool flags (None without
    --enable-auto-tool-choice, as in vLLM), checked against the tokenizer."""
    from vllm.parser import ParserManager

    return ParserManager.get_parser(tool_parser_name=settings.tool_call_parser, reasoning_parser_name=None,
                                    enable_auto_tools=settings.enable_auto_tool_choice,
                                    model_name=model_config.model,
                                    is_harmony=model_config.hf_config.model_type == "gpt_oss",
                                    tool_strict_level=settings.tool_strict_level, tokenizer=tokenizer)


def is_named(tool_choice: Any) -> bool:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionNamedToolChoiceParam

    return isinstance(tool_choice, ChatCompletionNamedToolChoiceParam)


def check_choice(vreq: Any, parser_cls: Any, enable_auto: bool) -> None:
    """vLLM's refusal of a tool choice the server cannot parse
    (`OnlineRenderer.render_chat`), as a 400 naming `tool_choice`."""
    if parser_cls is not None or vreq.tool_choice in (None, "none"):
        return
    if vreq.tool_choice == "auto" and not enable_auto:
        message = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    else:
        desc = f'function "{vreq.tool_choice.function.name}"' if is_named(vreq.tool_choice) else \
            f'"{vreq.tool_choice}"'
        message = f"tool_choice={desc} requires --tool-call-parser to be set"
    raise APIError(400, message, param="tool_choice")


def template_tools(vreq: Any, exclude_when_none: bool) -> list[dict[str, Any]] | None:
    """The chat template's `tools` argument (vLLM's: none with
    --exclude-tools-when-tool-choice-none and tool_choice "none")."""
    if vreq.tools is None or (vreq.tool_choice == "none" and exclude_when_none):
        return None
    return [tool.model_dump() for tool in vreq.tools]


def adjust(vreq: Any, parser_cls: Any, tokenizer: Any, model_config: Any, template_kwargs: dict[str, Any]) -> Any:
    """vLLM's `Parser.adjust_request` after rendering, for a tool choice
    other than "none": forces `required` and named calls (and, with
    `structured_outputs`, `auto` ones) through structured outputs, and lets
    the parser change what it needs (e.g. hermes keeps special tokens)."""
    if parser_cls is None or vreq.tool_choice == "none":
        return vreq
    return parser_cls(tokenizer, vreq.tools, model_config=model_config,
                      chat_template_kwargs=template_kwargs).adjust_request(request=vreq)


@dataclass
class ParsedChoice:
    """One finished choice as vLLM's chat server answers it."""

    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str


def parse_full(parser: Any, vreq: Any, output: Any, prompt_ids: list[int], enable_auto: bool) -> ParsedChoice:
    """A finished output through the request's own parser (one per choice:
    parsers are stateful), with vLLM's rules for the message and its
    finish_reason ("tool_calls" for auto and required calls, "stop" for
    named ones) and `parallel_tool_calls: false` (first call only)."""
    from vllm.entrypoints.generate.base.protocol import ToolCall
    from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
    from vllm.renderers.chat_utils import make_tool_call_id

    parser.set_prompt_token_ids(prompt_ids)
    _, content, calls = parser.parse(output.text, vreq, enable_auto_tools=enable_auto,
                                     model_output_token_ids=output.token_ids)
    named, required = is_named(vreq.tool_choice), vreq.tool_choice == "required"
    auto_called = False
    tool_calls: list[Any] = []
    if named or required:
        content = content or ""
        tool_calls = [ToolCall(id=c.id or make_tool_call_id(), function=c) for c in calls or []]
    elif vreq.tools and vreq.tool_choice in ("auto", None) and enable_auto and calls:
        auto_called = True
        tool_calls = [ToolCall(id=c.id or make_tool_call_id(), function=c) for c in calls]
    tool_calls = maybe_filter_parallel_tool_calls(tool_calls, vreq)
    finish = "tool_calls" if auto_called or (required and output.finish_reason == "stop") \
        else output.finish_reason or "stop"
    return ParsedChoice(content, [c.model_dump() for c in tool_calls], finish)


class StreamParser:
    """One streamed choice through its own parser (vLLM's `parse_delta`)."""

    def __init__(self, parser: Any, vreq: Any, prompt_ids: list[int]) -> None:
        self.parser, self.vreq, self.prompt_ids = parser, vreq, prompt_ids
        self.tools_streamed = False

    def delta(self, output: Any) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool call deltas) of this output's new tokens; (None, None): nothing to send."""
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls

        message = self.parser.parse_delta(delta_text=output.text, delta_token_ids=list(output.token_ids),
                                          request=self.vreq, prompt_token_ids=self.prompt_ids,
                                          finished=output.finish_reason is not None)
        if message is None:
            return None, None
        message = maybe_filter_parallel_tool_calls(message, self.vreq)
        if message.tool_calls:
            self.tools_streamed = True
        calls = [c.model_dump(exclude_none=True) for c in message.tool_calls] or None
        return message.content, calls

    def finish_reason(self, output: Any) -> str:
        """vLLM's streamed finish_reason: "tool_calls" once a call was
        streamed (not for a named tool choice)."""
        if self.tools_streamed and not is_named(self.vreq.tool_choice) and output.finish_reason == "stop":
            return "tool_calls"
        return output.finish_reason or "stop"
