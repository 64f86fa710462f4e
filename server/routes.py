"""HTTP endpoints: chat completions (plain and streamed), models, health,
metrics, and vLLM's /version, /ping, /tokenize and /detokenize."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from feather_vllm.kv.plan import report_of
from feather_vllm.pruning import config as pcfg
from server import fields, metrics
from server.auth import UNAUTHORIZED, key_index
from server.errors import APIError, error_body, validation_param
from server.offloop import OffLoopRoute
from server.pruning_report import build_report
from server.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    FeatherReport,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    Usage,
)
from server.state import GatewayState

router = APIRouter(route_class=OffLoopRoute)  # JSON bodies parsed in a worker thread
logger = logging.getLogger("server")


def state_of(request: Request) -> GatewayState:
    return request.app.state.gateway


def require_key(request: Request, state: GatewayState = Depends(state_of)) -> None:
    """Also checked by the Auth middleware, before the body is read; kept
    here so that no route mounted without it is left open."""
    keys = state.settings.api_keys
    index = key_index(request.headers.get("authorization", ""), keys) if keys else None
    if keys and index is None:
        raise APIError(401, UNAUTHORIZED, code="invalid_api_key")
    request.state.key_index = index  # which key: its prefix-cache salt (GatewayState.cache_salt)


def not_ready_error(state: GatewayState) -> APIError:
    """503 of a request the server cannot take: engine not ready, or the server draining for shutdown."""
    code = "server_shutting_down" if state.draining else "engine_unavailable"
    return APIError(503, state.not_ready_reason(), code=code, headers={"Retry-After": "5"})


def require_engine(state: GatewayState = Depends(state_of)) -> None:
    if not state.ready:
        raise not_ready_error(state)


@router.get("/health")
async def health(state: GatewayState = Depends(state_of)) -> Response:
    if state.ready:
        return JSONResponse({"status": "ok"})
    return JSONResponse(error_body(503, state.not_ready_reason()), 503, headers={"Retry-After": "5"})


@router.get("/live")
async def live() -> Response:
    """Liveness: the process and its event loop answer. 200 while the
    server drains for shutdown, when /health (readiness) answers 503. A dead
    engine makes the process exit (server/app.py), so no engine check here."""
    return JSONResponse({"status": "alive"})


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(await asyncio.to_thread(generate_latest), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def list_models(state: GatewayState = Depends(state_of)) -> ModelList:
    context = state.layout.max_model_len if state.layout is not None else None
    return ModelList(data=[ModelCard(id=state.settings.model_name, created=state.started, max_model_len=context)])


@router.api_route("/ping", methods=["GET", "POST"])
async def ping(state: GatewayState = Depends(state_of)) -> Response:
    """vLLM's (SageMaker's) liveness probe: /health's answer. Like /health,
    it needs no key (probes carry none)."""
    return await health(state)


@router.get("/version", dependencies=[Depends(require_key)])
async def version() -> dict[str, str]:
    """vLLM's /version ({"version": vLLM's}), with this package's version."""
    import importlib.metadata

    import vllm

    try:
        own = importlib.metadata.version("feather-vllm")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    return {"version": str(vllm.__version__), "feather_vllm": own}


def _check_model(name: str | None, state: GatewayState) -> None:
    served = state.settings.model_name
    if name is not None and name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def _validated(model: Any, body: dict[str, Any]) -> Any:
    """`body` as `model`, refused like a chat completion body when invalid."""
    from pydantic import ValidationError

    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


@router.post("/tokenize", dependencies=[Depends(require_key), Depends(require_engine)])
async def tokenize(body: dict[str, Any] = Body(...), state: GatewayState = Depends(state_of)) -> TokenizeResponse:
    """vLLM's /tokenize: a text `prompt`, or chat `messages` rendered with the
    chat template as a chat completion would be (text only: image parts
    are refused in this version)."""
    from vllm.renderers import TokenizeParams

    chat = "messages" in body
    req = _validated(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
    _check_model(req.model, state)
    check_unknown_fields(req.model_extra, state, "tokenize ")
    if chat:
        for name in ("chat_template", "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "tools"):
            if getattr(req, name) not in (None, [], {}):
                raise APIError(400, f"{name} is not supported by this server ({fields.ALL_FIELDS[name][1]})",
                               param=name, code="unsupported_parameter")
        if req.continue_final_message and req.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt: false",
                           param="continue_final_message")
        for m, message in enumerate(req.messages):
            for p, part in enumerate(message.content if isinstance(message.content, list) else ()):
                if part.type == "image_url":
                    raise APIError(400, "images are not tokenized by this server (text only)",
                                   param=f"messages[{m}].content[{p}]", code="unsupported_parameter")
        state.refuse_special_tokens(req.messages)
        conversation = await _conversation(req, state)
        tok_params = TokenizeParams(max_total_tokens=None, max_output_tokens=0,
                                    add_special_tokens=req.add_special_tokens)
        _, tokens = await state.render(conversation, tok_params, add_generation_prompt=req.add_generation_prompt,
                                       continue_final_message=req.continue_final_message)
    else:
        tok_params = TokenizeParams(max_total_tokens=None, max_output_tokens=0,
                                    add_special_tokens=req.add_special_tokens)
        prompt = await state.engine.renderer.tokenize_prompt_async({"prompt": req.prompt}, tok_params)
        tokens = list(prompt["prompt_token_ids"])
    strs = state.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=state.layout.max_model_len, tokens=tokens,
                            token_strs=strs)


@router.post("/detokenize", dependencies=[Depends(require_key), Depends(require_engine)])
async def detokenize(body: dict[str, Any] = Body(...), state: GatewayState = Depends(state_of)) -> DetokenizeResponse:
    """vLLM's /detokenize: token ids back to text."""
    from vllm.renderers import TokenizeParams

    req = _validated(DetokenizeRequest, body)
    _check_model(req.model, state)
    check_unknown_fields(req.model_extra, state, "detokenize ")
    vocab = state.engine.model_config.get_vocab_size()
    for i, token in enumerate(req.tokens):
        if token >= vocab:
            raise APIError(400, f"token id {token} is outside the vocabulary (size {vocab})", param=f"tokens[{i}]")
    params = TokenizeParams(max_total_tokens=None, max_output_tokens=0, needs_detokenization=True)
    prompt = await state.engine.renderer.tokenize_prompt_async({"prompt_token_ids": req.tokens}, params)
    return DetokenizeResponse(prompt=prompt["prompt"])


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


def check_unknown_fields(extra: dict[str, Any] | None, state: GatewayState, where: str = "") -> None:
    """Fields the gateway does not know: 400 naming the first, or, with
    --lenient-fields, ignored with a warning (as vLLM ignores them)."""
    if not extra:
        return
    if state.settings.lenient_fields:
        logger.warning("%sfields ignored (unknown, --lenient-fields): %s", where, sorted(extra))
        return
    name = next(iter(extra))
    raise APIError(400, f"unknown field {name!r} (a server started with --lenient-fields ignores unknown fields)",
                   param=name, code="unknown_parameter")


def _check_fields(body: ChatCompletionRequest, state: GatewayState) -> None:
    """Nothing is silently dropped: fields this server does not implement
    are refused by name (server/fields.py), unknown ones too unless lenient."""
    check_unknown_fields(body.model_extra, state, "chat completion ")
    refused = fields.refused_field(body.model_fields_set, body)
    if refused:
        note = fields.ALL_FIELDS[refused][1]
        raise APIError(400, f"{refused} is not supported by this server ({note})", param=refused,
                       code="unsupported_parameter")


def _vllm_request(body: ChatCompletionRequest) -> Any:
    """vLLM's own chat request with the fields the client set (the messages
    are the gateway's, rendered separately): its validators check them
    across fields and its methods make the sampling and tokenization params."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
    from vllm.exceptions import VLLMValidationError

    names = set(VllmChatRequest.model_fields) - {"messages"}
    data = body.model_dump(include=names, exclude_unset=True)
    data["messages"] = []
    try:
        return VllmChatRequest.model_validate(data)
    except VLLMValidationError as e:
        raise APIError(400, str(e.args[0] if e.args else e), param=e.parameter) from None
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        param = validation_param(tuple(first.get("loc", ())))
        raise APIError(400, f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}",
                       param=param) from None


def _unencodable(value: Any, path: str = "") -> str | None:
    """Path of the first string that is not valid Unicode (a lone surrogate
    from a JSON escape such as "\\ud800"), else None."""
    if isinstance(value, str):
        if value.isascii():  # O(1) in CPython; data URLs are megabytes of ASCII
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_path, sub in items:
        found = _unencodable(sub, sub_path)
        if found:
            return found
    return None


def _check_input(body: ChatCompletionRequest, state: GatewayState) -> None:
    """Checks across fields, and what the schema cannot express."""
    _check_fields(body, state)
    bad = _unencodable(body.model_dump(exclude_none=True))
    if bad:
        raise APIError(400, f"{bad}: text contains a lone surrogate (not valid Unicode)", param=bad)
    if body.n > 1 and body.temperature == 0:
        raise APIError(400, "n > 1 needs sampling (temperature > 0): greedy decoding has one answer", param="n")
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false", param="continue_final_message")


def _resolve_pruning(body: ChatCompletionRequest, state: GatewayState) -> pcfg.PruningConfig:
    spec = body.feather.model_dump(exclude_none=True, exclude={"return_kept"}) if body.feather else None
    try:
        config = pcfg.resolve(spec or None, state.default_config).validate(state.layout.num_layers)
    except pcfg.PruningConfigError as e:
        param = "feather" if e.field == "feather" else f"feather.{e.field}"
        raise APIError(400, f"{param}: {e.message}", param=param, code="invalid_pruning_settings") from None
    return config


async def _conversation(body: ChatCompletionRequest, state: GatewayState) -> list[dict[str, Any]]:
    """Messages for vLLM's chat renderer, images loaded and checked here."""
    images: list[tuple[int, int, str]] = []
    for m, message in enumerate(body.messages):
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
    conversation = []
    for m, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            conversation.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for p, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image_pil", "image_pil": by_position[(m, p)]})
        if role != "user":  # the template reads plain text for these roles
            conversation.append({"role": role, "content": "".join(x.get("text", "") for x in parts)})
        else:
            conversation.append({"role": role, "content": parts})
    return conversation


def _sampling_params(vreq: Any, config: pcfg.PruningConfig, max_tokens: int, state: GatewayState):
    """vLLM's own `to_sampling_params` (the model's generation config as the
    defaults, as `vllm serve`), the pruning settings in `extra_args`, and the
    engine's own checks of them (vocabulary, structured outputs, bad words)
    run here so that a bad value is a 400 before anything streams."""
    from vllm.exceptions import VLLMValidationError

    try:
        params = vreq.to_sampling_params(max_tokens, state.default_sampling_params)
        params.extra_args = {**(params.extra_args or {}), "feather": config.to_dict()}
        state.verify_params(params)
    except (VLLMValidationError, ValueError) as e:  # what the schema let through and vLLM refuses
        message = str(e.args[0] if isinstance(e, VLLMValidationError) and e.args else e)
        param = getattr(e, "parameter", None) or _named_field(message, vreq.model_fields_set)
        raise APIError(400, message, param=param) from None
    return params


def _named_field(message: str, candidates: set[str]) -> str | None:
    """The request field a vLLM error message names first (some of vLLM's
    checks name no parameter, e.g. min_tokens against max_tokens)."""
    import re

    found = [(m.start(), name) for name in candidates
             if (m := re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message))]
    return min(found)[1] if found else None


async def _chat(body: ChatCompletionRequest, request: Request, state: GatewayState) -> Response:
    _check_model(body.model, state)
    _check_input(body, state)
    state.refuse_special_tokens(body.messages)
    vreq = _vllm_request(body)
    tok_params = state.tok_params(vreq)
    cache_salt = state.cache_salt(getattr(request.state, "key_index", None), body.cache_salt)
    if not state.ready:  # began draining while this request was read and checked
        raise not_ready_error(state)
    if not state.admit():
        raise APIError(429, "too many requests waiting; retry later", code="queue_full",
                       headers={"Retry-After": "1"})
    engine_input = None
    try:
        config = _resolve_pruning(body, state)
        # A client that leaves while its image is fetched or its prompt rendered is not waited for.
        conversation = await _unless_disconnected(request, _conversation(body, state))
        engine_input, prompt_ids = await _unless_disconnected(request, state.render(
            conversation, tok_params, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, cache_salt=cache_salt))
        context = state.layout.max_model_len
        room = context - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; the context is {context}",
                           param="messages", code="context_length_exceeded")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is None:  # vLLM's default: the rest of the context, at most the generation config's
            default = state.default_sampling_params.get("max_tokens")
            room = min(room, default) if default else room
        if asked is not None and asked > room:
            raise APIError(400, f"max_tokens {asked} exceeds the {room} tokens left in the context "
                                f"({context} - {len(prompt_ids)} prompt tokens)",
                           param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
                           code="context_length_exceeded")
        params = _sampling_params(vreq, config, asked or room, state)
    except BaseException:
        if engine_input is not None:  # rendered, refused here: the engine never gets it
            state.forget_rendered(engine_input)
        state.release()
        raise
    call = _Call(state, body, config, engine_input, prompt_ids, params)
    if body.stream:
        return _EventStream(call, request)
    # A client that leaves before the answer cancels the request (and frees its KV).
    work = asyncio.ensure_future(call.complete())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
        await call.close()
    if work.cancelled():
        raise APIError(499, "client closed the request", code="client_closed_request")
    return JSONResponse(work.result().model_dump(exclude_none=False))


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """`await work`, cancelled (499) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise APIError(499, "client closed the request", code="client_closed_request")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _engine_error(err: Exception) -> APIError:
    from vllm.exceptions import VLLMClientError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(err, APIError):
        return err
    if isinstance(err, VLLMClientError):  # the engine refused the request (vLLM answers 400 too)
        message = err.args[0] if isinstance(err, VLLMValidationError) and err.args else str(err)
        return APIError(400, str(message), param=getattr(err, "parameter", None))
    if isinstance(err, EngineDeadError):
        return APIError(503, "the engine has died; the server must be restarted", code="engine_dead",
                        headers={"Retry-After": "30"})
    return APIError(500, f"the engine failed on this request: {type(err).__name__}", code="engine_error")


def _failed_in_engine(request_id: str) -> APIError:
    """finish_reason "error": the engine failed the request (vLLM's server
    answers 500 too; retrying may succeed, e.g. after a multimodal cache miss)."""
    logger.warning("%s: the engine ended the request with an error", request_id)
    return APIError(500, "the engine failed on this request; retrying may succeed", code="engine_error")


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


class _EventStream(StreamingResponse):
    """SSE response that always settles its request: however the response
    ends (finished, client gone, never started), the engine request is
    aborted if unfinished and the admission slot is released."""

    def __init__(self, call: "_Call", request: Request) -> None:
        super().__init__(call.stream(request), media_type="text/event-stream")
        self.call = call

    async def __call__(self, scope, receive, send) -> None:
        # A client that stops reading (connected, its receive window full)
        # would hold the request's slot forever: a send that cannot complete
        # within the timeout ends the stream.
        timeout = self.call.state.settings.stream_send_timeout_s
        stalled = False

        async def timed_send(message) -> None:
            nonlocal stalled
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                stalled = True
                raise

        try:
            await super().__call__(scope, receive, timed_send)
        except BaseException:
            if not stalled:
                raise
            logger.warning("%s: the client read nothing for %s s; stream ended, request aborted",
                           self.call.request_id, timeout)
        finally:
            await self.body_iterator.aclose()
            await self.call.close()


class _Call:
    """One chat completion in flight: runs it, measures it, reports it."""

    def __init__(self, state: GatewayState, body: ChatCompletionRequest, config: pcfg.PruningConfig,
                 engine_input: Any, prompt_ids: list[int], params: Any) -> None:
        self.state, self.body, self.config = state, body, config
        self.engine_input, self.prompt_ids, self.params = engine_input, prompt_ids, params
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"  # the engine's: unique whatever the client sends
        # What the client sees: vLLM's `chatcmpl-<request_id>` when it set one.
        self.response_id = f"chatcmpl-{body.request_id}" if body.request_id else self.request_id
        self.created = int(time.time())
        self.preset = metrics.config_label(config, body.feather)  # a closed set: known presets or "custom"
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.generated = [0] * body.n
        self.started = False  # the engine has the request
        self.finished = False  # the engine finished it
        self.closed = False
        self.report: FeatherReport | None = None
        self.shutdown_aborted = False  # aborted unfinished at shutdown (abort_for_shutdown)
        state.calls.add(self)
        metrics.WAITING.inc()

    async def abort_for_shutdown(self, reason: str) -> None:
        """The drain is over (timeout or second SIGTERM) and this request is
        unfinished: abort it in the engine. A stream then ends with
        finish_reason "abort" and an error event; a plain request gets 503."""
        if self.closed or self.finished:
            return
        if not self.shutdown_aborted:
            self.shutdown_aborted = True
            metrics.SHUTDOWN_ABORTS.labels(reason).inc()
            logger.warning("%s: aborted unfinished at shutdown (%s)", self.request_id, reason)
        if self.started:
            await self.state.engine.abort(self.request_id)

    async def close(self) -> None:
        """Settle the request once: abort it in the engine if it is still
        there, record its metrics, release its admission slot."""
        if self.closed:
            return
        self.closed = True
        self.state.calls.discard(self)
        try:
            if not self.started:  # rendered, never given to the engine (the client left first)
                self.state.forget_rendered(self.engine_input)
            elif not self.finished:
                await self.state.engine.abort(self.request_id)
        finally:
            self._finish(self.report)
            self.state.release()

    def _on_tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.WAITING.dec()
            metrics.RUNNING.inc()
            metrics.TTFT.labels(self.preset).observe(now - self.start)
        elif self.last_token_at is not None:
            metrics.ITL.labels(self.preset).observe((now - self.last_token_at) / count)
        self.last_token_at = now

    def _finish(self, report: FeatherReport | None) -> None:
        if self.first_token_at is None:
            metrics.WAITING.dec()
        else:
            metrics.RUNNING.dec()
        metrics.E2E.labels(self.preset).observe(time.perf_counter() - self.start)
        metrics.PROMPT_TOKENS.labels(self.preset).inc(len(self.prompt_ids))
        metrics.GENERATION_TOKENS.labels(self.preset).inc(sum(self.generated))
        if report is not None:
            metrics.IMAGE_TOKENS.labels(self.preset).inc(report.image_tokens)
            for stage in report.stages:
                metrics.IMAGE_TOKENS_KEPT.labels(self.preset, str(stage.layer)).inc(stage.kept)
            metrics.KV_BLOCKS_USED.labels(self.preset).inc(report.kv_blocks.used)
            metrics.KV_BLOCKS_UNPRUNED.labels(self.preset).inc(report.kv_blocks.unpruned)
            if report.fallback:
                metrics.FALLBACKS.labels(report.fallback.reason).inc()

    def _report(self, final: Any) -> FeatherReport | None:
        """The engine's report of a finished request (None before it finished)."""
        report = report_of(final)
        if report is None:
            return None
        return build_report(report, return_kept=bool(self.body.feather and self.body.feather.return_kept))

    def _usage(self) -> Usage:
        completion = sum(self.generated)
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=completion,
                     total_tokens=len(self.prompt_ids) + completion)

    def _logprobs(self, output: Any) -> dict[str, Any] | None:
        if not self.body.logprobs or output.logprobs is None:
            return None
        return chat_logprobs(output.token_ids, output.logprobs, self.body.top_logprobs or 0, self.state.tokenizer,
                             as_token_ids=bool(self.body.return_tokens_as_token_ids),
                             return_all=bool(self.body.logprob_token_ids))

    def _shutdown_error(self) -> APIError:
        return APIError(503, "the server shut down before the answer was complete; retry on another instance",
                        code="server_shutdown", headers={"Retry-After": "5"})

    def _generate(self) -> Any:
        if self.shutdown_aborted:  # aborted at shutdown before the engine had it
            raise self._shutdown_error()
        return self.state.engine.generate(self.engine_input, self.params, self.request_id,
                                          priority=self.body.priority, session_id=self.body.session_id)

    async def complete(self) -> ChatCompletionResponse:
        final = None
        self.started = True
        try:
            async for final in self._generate():
                for out in final.outputs:
                    self._on_tokens(len(out.token_ids) - self.generated[out.index])
                    self.generated[out.index] = len(out.token_ids)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("engine failed on %s", self.request_id)
            raise _engine_error(e) from None
        self.finished = final is not None and final.finished
        if self.shutdown_aborted:
            raise self._shutdown_error()
        if any(o.finish_reason == "error" for o in final.outputs):
            raise _failed_in_engine(self.request_id)
        report = self.report = self._report(final)
        logprobs = [None] * len(final.outputs)
        if self.body.logprobs:  # thousands of entries for long answers: off the event loop
            logprobs = await asyncio.to_thread(lambda: [self._logprobs(o) for o in final.outputs])
        choices = [Choice(index=o.index, message=ChatMessage(content=o.text), logprobs=lp,
                          finish_reason=o.finish_reason, stop_reason=o.stop_reason)
                   for o, lp in zip(final.outputs, logprobs)]
        return ChatCompletionResponse(id=self.response_id, created=self.created, model=self.state.settings.model_name,
                                      choices=choices, usage=self._usage(), feather=report)

    def _chunk(self, **fields: Any) -> str:
        chunk = ChatCompletionChunk(id=self.response_id, created=self.created,
                                    model=self.state.settings.model_name, **fields)
        data = chunk.model_dump(exclude_none=True)
        if chunk.feather is not None:  # the report keeps its nulls (e.g. "fallback": null)
            data["feather"] = chunk.feather.model_dump()
        return f"data: {json.dumps(data)}\n\n"

    async def stream(self, request: Request) -> AsyncIterator[str]:
        out = None
        role_sent = False
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        ended: set[int] = set()  # choices whose finish_reason was sent
        try:
            self.started = True
            try:
                async for out in self._generate():
                    if not role_sent:
                        # Like vLLM's server, the role chunk goes out with the first
                        # engine output: clients time the first token from it.
                        role_sent = True
                        yield self._chunk(choices=[ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                                                   for i in range(self.body.n)])
                    if any(o.finish_reason == "error" for o in out.outputs):
                        raise _failed_in_engine(self.request_id)
                    for o in out.outputs:
                        self._on_tokens(len(o.token_ids))
                        self.generated[o.index] += len(o.token_ids)
                        if o.finish_reason:
                            ended.add(o.index)
                        if o.text or o.finish_reason:
                            yield self._chunk(choices=[ChunkChoice(
                                index=o.index, delta=Delta(content=o.text or None),
                                logprobs=self._logprobs(o), finish_reason=o.finish_reason,
                                stop_reason=o.stop_reason if o.finish_reason else None)])
                    if await request.is_disconnected():
                        return  # close() aborts it in the engine and frees its KV
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                # Headers are sent: report the failure in-band, as vLLM's server does.
                logger.exception("engine failed on %s", self.request_id)
                err = _engine_error(e)
                yield f"data: {json.dumps(error_body(err.status, err.message, code=err.code))}\n\n"
                yield "data: [DONE]\n\n"
                return
            self.finished = out is not None and out.finished
            if self.shutdown_aborted:
                # Never a silently cut answer: each choice ends with finish_reason "abort", then this error.
                for i in sorted(set(range(self.body.n)) - ended):
                    yield self._chunk(choices=[ChunkChoice(index=i, delta=Delta(), finish_reason="abort")])
                err = self._shutdown_error()
                yield f"data: {json.dumps(error_body(err.status, err.message, code=err.code))}\n\n"
                yield "data: [DONE]\n\n"
                return
            self.report = self._report(out)
            # The last chunk carries the pruning report (and usage when asked).
            yield self._chunk(choices=[], usage=self._usage() if include_usage else None, feather=self.report)
            yield "data: [DONE]\n\n"
        finally:
            await self.close()
