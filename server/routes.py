"""HTTP endpoints: chat completions (plain and streamed), models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from feather_vllm.pruning import config as pcfg
from server import metrics
from server.errors import APIError, error_body
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
    ModelCard,
    ModelList,
    Usage,
)
from server.state import GatewayState

router = APIRouter()


def state_of(request: Request) -> GatewayState:
    return request.app.state.gateway


def require_key(request: Request, state: GatewayState = Depends(state_of)) -> None:
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {key}":
        raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")


def require_engine(state: GatewayState = Depends(state_of)) -> None:
    if not state.ready:
        raise APIError(503, state.not_ready_reason(), code="engine_unavailable", headers={"Retry-After": "5"})


@router.get("/health")
async def health(state: GatewayState = Depends(state_of)) -> Response:
    if state.ready:
        return JSONResponse({"status": "ok"})
    return JSONResponse(error_body(503, state.not_ready_reason()), 503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def list_models(state: GatewayState = Depends(state_of)) -> ModelList:
    return ModelList(data=[ModelCard(id=state.settings.model_name, created=state.started)])


@router.post("/v1/chat/completions", dependencies=[Depends(require_key), Depends(require_engine)])
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: GatewayState = Depends(state_of)) -> Response:
    preset_label = (body.feather.preset if body.feather and body.feather.preset else None) or "default"
    try:
        response = await _chat(body, request, state)
    except APIError as err:
        metrics.REQUESTS.labels(str(err.status), preset_label).inc()
        raise
    metrics.REQUESTS.labels("200", preset_label).inc()
    return response


def _resolve_pruning(body: ChatCompletionRequest, state: GatewayState) -> pcfg.PruningConfig:
    spec = body.feather.model_dump(exclude_none=True) if body.feather else None
    try:
        config = pcfg.resolve(spec or None, state.default_config).validate(state.layout.num_layers)
    except pcfg.PruningConfigError as e:
        param = "feather" if e.field == "feather" else f"feather.{e.field}"
        raise APIError(400, f"{param}: {e.message}", param=param, code="invalid_pruning_settings") from None
    boundaries = state.layout.kv_boundaries
    for i, stage in enumerate(config.stages):
        if boundaries and stage.layer not in boundaries:
            raise APIError(400, f"feather.stages[{i}].layer: {stage.layer} is not a KV stage boundary of this "
                                f"server (cut layers allowed: {list(boundaries)})",
                           param=f"feather.stages[{i}].layer", code="invalid_pruning_settings")
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
    limit = state.settings.max_images_per_request
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


def _sampling_params(body: ChatCompletionRequest, config: pcfg.PruningConfig, max_tokens: int, stream: bool):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    logprobs = None
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    return SamplingParams(
        n=body.n,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=1.0 if body.top_p is None else float(body.top_p),
        seed=body.seed,
        stop=body.stop,
        logprobs=logprobs,
        extra_args={"feather": config.to_dict()},
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


async def _chat(body: ChatCompletionRequest, request: Request, state: GatewayState) -> Response:
    settings = state.settings
    if body.model != settings.model_name:
        raise APIError(404, f"model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")
    if not state.admit():
        raise APIError(429, "too many requests waiting; retry later", code="queue_full",
                       headers={"Retry-After": "1"})
    try:
        config = _resolve_pruning(body, state)
        conversation = await _conversation(body, state)
        engine_input, prompt_ids = await state.render(conversation)
        room = settings.max_model_len - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; the context is {settings.max_model_len}",
                           param="messages", code="context_length_exceeded")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > room:
            raise APIError(400, f"max_tokens {asked} exceeds the {room} tokens left in the context "
                                f"({settings.max_model_len} - {len(prompt_ids)} prompt tokens)",
                           param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
                           code="context_length_exceeded")
        params = _sampling_params(body, config, asked or room, body.stream)
    except BaseException:
        state.release()
        raise
    call = _Call(state, body, config, engine_input, prompt_ids, params)
    if body.stream:
        return StreamingResponse(call.stream(request), media_type="text/event-stream")
    try:
        return JSONResponse((await call.complete()).model_dump(exclude_none=False))
    finally:
        state.release()


class _Call:
    """One chat completion in flight: runs it, measures it, reports it."""

    def __init__(self, state: GatewayState, body: ChatCompletionRequest, config: pcfg.PruningConfig,
                 engine_input: Any, prompt_ids: list[int], params: Any) -> None:
        self.state, self.body, self.config = state, body, config
        self.engine_input, self.prompt_ids, self.params = engine_input, prompt_ids, params
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.preset = config.name
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.generated = [0] * body.n
        metrics.WAITING.inc()

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
                metrics.FALLBACKS.labels(report.fallback["reason"]).inc()

    def _report(self, final: Any) -> FeatherReport:
        params = getattr(final, "kv_transfer_params", None) or {}
        return build_report(self.config, self.prompt_ids, max(self.generated, default=0), self.state.layout,
                            params.get("feather"))

    def _usage(self) -> Usage:
        completion = sum(self.generated)
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=completion,
                     total_tokens=len(self.prompt_ids) + completion)

    def _logprobs(self, output: Any) -> dict[str, Any] | None:
        if not self.body.logprobs or output.logprobs is None:
            return None
        tokenizer = self.state.tokenizer
        content = []
        for token_id, candidates in zip(output.token_ids, output.logprobs):
            def entry(tid: int, lp: Any) -> dict[str, Any]:
                text = lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([tid])
                return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}
            top = sorted(candidates.items(), key=lambda kv: kv[1].rank)[: self.body.top_logprobs or 0]
            content.append({**entry(token_id, candidates[token_id]),
                            "top_logprobs": [entry(t, lp) for t, lp in top]})
        return {"content": content}

    async def complete(self) -> ChatCompletionResponse:
        final = None
        report = None
        try:
            async for final in self.state.engine.generate(self.engine_input, self.params, self.request_id):
                for out in final.outputs:
                    self._on_tokens(len(out.token_ids) - self.generated[out.index])
                    self.generated[out.index] = len(out.token_ids)
            report = self._report(final)
        except asyncio.CancelledError:
            await self.state.engine.abort(self.request_id)
            raise
        finally:
            self._finish(report)
        choices = [Choice(index=o.index, message=ChatMessage(content=o.text),
                          logprobs=self._logprobs(o), finish_reason=o.finish_reason) for o in final.outputs]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.state.settings.model_name,
                                      choices=choices, usage=self._usage(), feather=report)

    def _chunk(self, **fields: Any) -> str:
        chunk = ChatCompletionChunk(id=self.request_id, created=self.created,
                                    model=self.state.settings.model_name, **fields)
        data = chunk.model_dump(exclude_none=True)
        if chunk.feather is not None:  # the report keeps its nulls (e.g. "fallback": null)
            data["feather"] = chunk.feather.model_dump()
        return f"data: {json.dumps(data)}\n\n"

    async def stream(self, request: Request) -> AsyncIterator[str]:
        finished = False
        out = None
        report = None
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            yield self._chunk(choices=[ChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                                       for i in range(self.body.n)])
            async for out in self.state.engine.generate(self.engine_input, self.params, self.request_id):
                for o in out.outputs:
                    self._on_tokens(len(o.token_ids))
                    self.generated[o.index] += len(o.token_ids)
                    if o.text or o.finish_reason:
                        yield self._chunk(choices=[ChunkChoice(
                            index=o.index, delta=Delta(content=o.text or None),
                            logprobs=self._logprobs(o), finish_reason=o.finish_reason)])
                if await request.is_disconnected():
                    break
            finished = out is not None and out.finished
            report = self._report(out)
            # The last chunk carries the pruning report (and usage when asked).
            yield self._chunk(choices=[], usage=self._usage() if include_usage else None, feather=report)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                # Client went away (or the stream broke): free its KV now.
                await self.state.engine.abort(self.request_id)
            self._finish(report)
            self.state.release()
