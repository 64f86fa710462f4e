"""POST /v1/chat/completions: checks, rendering through vLLM's chat
renderer, vLLM's own sampling params, and the answer (plain or streamed)
with the `feather` pruning report."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from feather_vllm.pruning import config as pcfg
from server import fields, metrics, tools
from server.conversation import check_template_input, conversation, image_sizes
from server.deps import (check_model, check_unknown_fields, not_ready_error, require_engine, require_key, state_of,
                         unencodable)
from server.errors import APIError, stream_error_event, validation_param
from server.inflight import Call, engine_error, failed_in_engine, respond, unless_disconnected
from server.logprobs import chat_logprobs
from server.offloop import OffLoopRoute
from server.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
)
from server.state import GatewayState

router = APIRouter(route_class=OffLoopRoute)  # JSON bodies parsed in a worker thread
logger = logging.getLogger("server")


@router.post("/v1/chat/completions", dependencies=[Depends(require_key), Depends(require_engine)])
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: GatewayState = Depends(state_of)) -> Response:
    # Counted by metrics.ResponseCounter, with a label from a closed set.
    metrics.set_preset_label(request.scope, metrics.request_preset_label(body.feather))
    try:
        return await _chat(body, request, state)
    except APIError as err:
        if err.code == "invalid_pruning_settings":
            metrics.set_preset_label(request.scope, "invalid")
        raise


def _check_fields(body: ChatCompletionRequest, state: GatewayState) -> None:
    """Nothing is silently dropped: fields this server does not implement
    are refused by name (server/fields.py), unknown ones too unless lenient."""
    check_unknown_fields(body.model_extra, state, "chat completion ")
    refused = fields.refused_field(body.model_fields_set, body)
    if refused:
        note = fields.ALL_FIELDS[refused][1]
        raise APIError(400, f"{refused} is not supported by this server ({note})", param=refused,
                       code="unsupported_parameter")
    option = fields.refused_structured_option(body.structured_outputs)
    if option:
        raise APIError(400, f"{option} is not supported per request: vLLM's structured-output backends read "
                            "it from the engine's --structured-outputs-config", param=option,
                       code="unsupported_parameter")


def vllm_request(data: dict[str, Any], request_class: Any) -> Any:
    """vLLM's own request (`request_class`) of the fields the client set:
    its validators check them across fields and its methods make the
    sampling and tokenization params. Its refusals are 400s naming the field."""
    from pydantic import ValidationError
    from vllm.exceptions import VLLMValidationError

    try:
        return request_class.model_validate(data)
    except VLLMValidationError as e:
        raise APIError(400, str(e.args[0] if e.args else e), param=e.parameter) from None
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        param = validation_param(tuple(first.get("loc", ())))
        raise APIError(400, f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}",
                       param=param) from None


def _vllm_request(body: ChatCompletionRequest) -> Any:
    """vLLM's chat request with the fields the client set; the messages are
    the gateway's, rendered separately."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

    names = set(VllmChatRequest.model_fields) - {"messages"}
    data = body.model_dump(include=names, exclude_unset=True)
    data["messages"] = []
    return vllm_request(data, VllmChatRequest)


def _check_input(body: ChatCompletionRequest, state: GatewayState) -> None:
    """Checks across fields, and what the schema cannot express."""
    _check_fields(body, state)
    bad = unencodable(body.model_dump(exclude_none=True))
    if bad:
        raise APIError(400, f"{bad}: text contains a lone surrogate (not valid Unicode)", param=bad)
    if body.n > 1 and body.temperature == 0:
        raise APIError(400, "n > 1 needs sampling (temperature > 0): greedy decoding has one answer", param="n")
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false", param="continue_final_message")
    if body.echo and body.top_logprobs is not None:
        # vLLM's echo asks the engine for prompt logprobs at top_logprobs; they are refused here (prompt_logprobs).
        raise APIError(400, "echo with top_logprobs asks for prompt logprobs, which this server does not return "
                            f"({fields.ALL_FIELDS['prompt_logprobs'][1]})", param="top_logprobs",
                       code="unsupported_parameter")
    check_template_input(state, body.messages, body.chat_template_kwargs, body.tools)


def resolve_pruning(feather: Any, state: GatewayState) -> pcfg.PruningConfig:
    """The request's pruning settings (server.schemas.FeatherSettings or
    None) resolved against the server's default and validated for the model."""
    spec = feather.model_dump(exclude_none=True, exclude={"return_kept"}) if feather else None
    try:
        config = pcfg.resolve(spec or None, state.default_config)
        if config.enabled and not state.layout.pruning.available:  # decided once, at start (server/engine.py)
            raise APIError(400, f"feather: {state.layout.pruning.unavailable_reason}; this server runs the model "
                                "unpruned (send no feather settings, or preset 'none')",
                           param="feather", code="pruning_unavailable")
        config = config.validate(state.layout.num_layers)
    except pcfg.PruningConfigError as e:
        param = "feather" if e.field == "feather" else f"feather.{e.field}"
        raise APIError(400, f"{param}: {e.message}", param=param, code="invalid_pruning_settings") from None
    return config


def sampling_params(vreq: Any, config: pcfg.PruningConfig | None, max_tokens: int, state: GatewayState,
                    prompt_logprobs: bool = True) -> Any:
    """vLLM's own `to_sampling_params` (the model's generation config as the
    defaults, as `vllm serve`), the pruning settings in `extra_args`, and the
    engine's own checks of them (vocabulary, structured outputs, bad words)
    run here so that a bad value is a 400 before anything streams.
    `prompt_logprobs` False: none, whatever vLLM derives (chat's echo asks
    for them; pruned image tokens have none)."""
    from vllm.exceptions import VLLMValidationError

    try:
        params = vreq.to_sampling_params(max_tokens, state.default_sampling_params)
        if not prompt_logprobs:
            params.prompt_logprobs = None
        if config is not None and state.layout.pruning.available:  # else vLLM's own model: no pruning args
            params.extra_args = {**(params.extra_args or {}), "feather": config.to_dict()}
        state.verify_params(params)
    except (VLLMValidationError, ValueError) as e:  # what the schema let through and vLLM refuses
        message = str(e.args[0] if isinstance(e, VLLMValidationError) and e.args else e)
        param = getattr(e, "parameter", None) or named_field(message, vreq.model_fields_set)
        raise APIError(400, message, param=param) from None
    return params


def named_field(message: str, candidates: set[str]) -> str | None:
    """The request field a vLLM error message names first (some of vLLM's
    checks name no parameter, e.g. min_tokens against max_tokens)."""
    found = [(m.start(), name) for name in candidates
             if (m := re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message))]
    return min(found)[1] if found else None


def max_tokens_room(prompt_len: int, asked: int | None, param: str, state: GatewayState,
                    prompt_param: str = "messages") -> int:
    """The completion budget: `asked`, checked against the context left
    after the prompt (400 when it does not fit), or vLLM's default (the
    rest of the context, at most the generation config's)."""
    context = state.layout.max_model_len
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens; the context is {context}",
                       param=prompt_param,
                       code="context_length_exceeded")
    if asked is None:  # vLLM's default: the rest of the context, at most the generation config's
        default = state.default_sampling_params.get("max_tokens")
        return min(room, default) if default else room
    if asked > room:
        raise APIError(400, f"max_tokens {asked} exceeds the {room} tokens left in the context "
                            f"({context} - {prompt_len} prompt tokens)",
                       param=param, code="context_length_exceeded")
    return asked


async def _chat(body: ChatCompletionRequest, request: Request, state: GatewayState) -> Response:
    check_model(body.model, state)
    _check_input(body, state)
    vreq = _vllm_request(body)
    tools.check_choice(vreq, state.tool_parser, state.settings.enable_auto_tool_choice)
    tok_params = state.tok_params(vreq)
    cache_salt = state.cache_salt(getattr(request.state, "key_index", None), body.cache_salt)
    template_kwargs = dict(body.chat_template_kwargs or {})
    tool_dicts = tools.template_tools(vreq, state.settings.exclude_tools_when_tool_choice_none)
    if tool_dicts is not None:
        template_kwargs["tools"] = tool_dicts
    if not state.ready:  # began draining while this request was read and checked
        raise not_ready_error(state)
    if not state.admit():
        raise APIError(429, "too many requests waiting; retry later", code="queue_full",
                       headers={"Retry-After": "1"})
    engine_input = None
    try:
        config = resolve_pruning(body.feather, state)
        # A client that leaves while its image is fetched or its prompt rendered is not waited for.
        messages = await unless_disconnected(request, conversation(body.messages, state))
        engine_input, prompt_ids = await unless_disconnected(request, state.render(
            messages, tok_params, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, cache_salt=cache_salt,
            template_kwargs=template_kwargs))
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = max_tokens_room(len(prompt_ids), asked,
                                     "max_completion_tokens" if body.max_completion_tokens else "max_tokens", state)
        if vreq.tools:  # vLLM's adjust_request: structured outputs for the tool choice
            vreq = tools.adjust(vreq, state.tool_parser, state.tokenizer, state.engine.model_config, template_kwargs)
        params = sampling_params(vreq, config, max_tokens, state, prompt_logprobs=False)
    except BaseException:
        if engine_input is not None:  # rendered, refused here: the engine never gets it
            state.forget_rendered(engine_input)
        state.release()
        raise
    call = ChatCall(state, body, vreq, config, engine_input, prompt_ids, params, image_sizes(messages))
    return await respond(call, request, body.stream)


def _echo_text(body: ChatCompletionRequest, role: str) -> str:
    """vLLM's chat echo: the last message's text when it has the answer's role."""
    last = body.messages[-1]
    if last.role != role or not last.content:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(part.text for part in last.content if part.type == "text")


class ChatCall(Call):
    """One chat completion in flight."""

    def __init__(self, state: GatewayState, body: ChatCompletionRequest, vreq: Any, config: pcfg.PruningConfig,
                 engine_input: Any, prompt_ids: list[int], params: Any,
                 image_sizes: tuple[tuple[int, int], ...]) -> None:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        super().__init__(state, engine_input, prompt_ids, params, request_id=request_id,
                         # What the client sees: vLLM's `chatcmpl-<request_id>` when it set one.
                         response_id=f"chatcmpl-{body.request_id}" if body.request_id else request_id,
                         n=body.n, preset=metrics.config_label(config, body.feather),
                         return_kept=bool(body.feather and body.feather.return_kept),
                         priority=body.priority, session_id=body.session_id, image_sizes=image_sizes)
        self.body, self.vreq, self.config = body, vreq, config
        # vLLM's role of the answer, and the parser of tool calls (requests with tools only).
        self.role = "assistant" if body.add_generation_prompt else body.messages[-1].role
        self.parser_cls = state.tool_parser if vreq.tools else None

    def _new_parser(self) -> Any:
        """A parser for one choice (parsers are stateful)."""
        return self.parser_cls(self.state.tokenizer, self.vreq.tools, model_config=self.state.engine.model_config,
                               chat_template_kwargs=self.body.chat_template_kwargs or {})

    def _logprobs(self, output: Any) -> dict[str, Any] | None:
        if not self.body.logprobs or output.logprobs is None:
            return None
        return chat_logprobs(output.token_ids, output.logprobs, self.body.top_logprobs or 0, self.state.tokenizer,
                             as_token_ids=bool(self.body.return_tokens_as_token_ids),
                             return_all=bool(self.body.logprob_token_ids))

    def _prompt_text(self, out: Any) -> str | None:
        """vLLM's return_prompt_text: the rendered prompt (the engine's, else decoded)."""
        if not self.body.return_prompt_text:
            return None
        return out.prompt if out.prompt is not None else self.state.tokenizer.decode(self.prompt_ids)

    def _choice(self, output: Any, logprobs: dict[str, Any] | None) -> Choice:
        token_ids = list(output.token_ids) if self.body.return_token_ids else None
        echo = _echo_text(self.body, self.role) if self.body.echo else ""
        if self.parser_cls is None:
            message = ChatMessage(role=self.role, content=echo + output.text if echo else output.text)
            finish = output.finish_reason
        else:
            parsed = tools.parse_full(self._new_parser(), self.vreq, output, self.prompt_ids,
                                      self.state.settings.enable_auto_tool_choice)
            content = echo + (parsed.content or "") if echo else parsed.content
            message = ChatMessage(role=self.role, content=content, tool_calls=parsed.tool_calls)
            finish = parsed.finish_reason
        return Choice(index=output.index, message=message, logprobs=logprobs, finish_reason=finish,
                      stop_reason=output.stop_reason, token_ids=token_ids)

    async def complete(self) -> ChatCompletionResponse:
        final = await self.run_to_end()
        logprobs = [None] * len(final.outputs)
        if self.body.logprobs:  # thousands of entries for long answers: off the event loop
            logprobs = await asyncio.to_thread(lambda: [self._logprobs(o) for o in final.outputs])
        choices = [self._choice(o, lp) for o, lp in zip(final.outputs, logprobs)]
        return ChatCompletionResponse(id=self.response_id, created=self.created, model=self.state.settings.model_name,
                                      choices=choices, usage=self.usage(),
                                      prompt_token_ids=self.prompt_ids if self.body.return_token_ids else None,
                                      prompt_text=self._prompt_text(final), feather=self.report)

    def _chunk(self, **fields: Any) -> str:
        chunk = ChatCompletionChunk(id=self.response_id, created=self.created,
                                    model=self.state.settings.model_name, **fields)
        data = chunk.model_dump(exclude_none=True)
        if chunk.feather is not None:  # the report keeps its nulls (e.g. "fallback": null)
            data["feather"] = chunk.feather.model_dump()
        return f"data: {json.dumps(data)}\n\n"

    def _opening(self, out: Any) -> Iterator[str]:
        """The role chunk of each choice (with the prompt's token ids and text
        when asked), then the echoed text, as vLLM's server sends them."""
        n = self.body.n
        prompt_ids = self.prompt_ids if self.body.return_token_ids else None
        yield self._chunk(choices=[ChunkChoice(index=i, delta=Delta(role=self.role, content=""))
                                   for i in range(n)], prompt_token_ids=prompt_ids, prompt_text=self._prompt_text(out))
        echo = _echo_text(self.body, self.role) if self.body.echo else ""
        if echo:
            yield self._chunk(choices=[ChunkChoice(index=i, delta=Delta(content=echo)) for i in range(n)])

    async def stream(self, request: Request) -> AsyncIterator[str]:
        out = None
        role_sent = False
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        ended: set[int] = set()  # choices whose finish_reason was sent
        parsers = [tools.StreamParser(self._new_parser(), self.vreq, self.prompt_ids) if self.parser_cls else None
                   for _ in range(self.body.n)]
        try:
            self.started = True
            try:
                async for out in self.generate():
                    if not role_sent:
                        # Like vLLM's server, the role chunk goes out with the first
                        # engine output: clients time the first token from it.
                        role_sent = True
                        for line in self._opening(out):
                            yield line
                    if any(o.finish_reason == "error" for o in out.outputs):
                        raise failed_in_engine(self.request_id)
                    for o in out.outputs:
                        self.on_tokens(len(o.token_ids))
                        self.generated[o.index] += len(o.token_ids)
                        if o.finish_reason:
                            ended.add(o.index)
                        token_ids = list(o.token_ids) if self.body.return_token_ids and o.token_ids else None
                        parser = parsers[o.index]
                        if parser is None:
                            content, calls, finish = o.text or None, None, o.finish_reason
                        else:
                            content, calls = parser.delta(o)
                            finish = parser.finish_reason(o) if o.finish_reason else None
                        logprobs = self._logprobs(o)
                        # A token with no text (a partial UTF-8 byte, a special token) still
                        # gets its chunk when its logprobs or ids were asked for, as in vLLM.
                        if content or calls or finish or token_ids or logprobs is not None:
                            yield self._chunk(choices=[ChunkChoice(
                                index=o.index, delta=Delta(content=content, tool_calls=calls),
                                logprobs=logprobs, finish_reason=finish,
                                stop_reason=o.stop_reason if o.finish_reason else None, token_ids=token_ids)])
                    if await request.is_disconnected():
                        return  # close() aborts it in the engine and frees its KV
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                # Headers are sent: report the failure in-band, as vLLM's server does.
                logger.exception("engine failed on %s", self.request_id)
                err = engine_error(e)
                yield stream_error_event(err)
                yield "data: [DONE]\n\n"
                return
            self.finished = out is not None and out.finished
            if self.shutdown_aborted:
                # Never a silently cut answer: each choice ends with finish_reason "abort", then this error.
                for i in sorted(set(range(self.body.n)) - ended):
                    yield self._chunk(choices=[ChunkChoice(index=i, delta=Delta(), finish_reason="abort")])
                err = self.shutdown_error()
                yield stream_error_event(err)
                yield "data: [DONE]\n\n"
                return
            self.report = self.engine_report(out)
            # The last chunk carries the pruning report (and usage when asked).
            yield self._chunk(choices=[], usage=self.usage() if include_usage else None, feather=self.report)
            yield "data: [DONE]\n\n"
        finally:
            await self.close()
