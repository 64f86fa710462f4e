"""One engine request in flight, whatever the endpoint: admission slot,
metrics, aborts (client gone, shutdown), engine failures as OpenAI errors,
and the two ways of answering (one JSON body, or server-sent events)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from feather_vllm.kv.plan import report_of
from server import metrics
from server.errors import APIError
from server.pruning_report import build_report
from server.schemas import FeatherReport, Usage
from server.state import GatewayState

logger = logging.getLogger("server")


def engine_error(err: Exception) -> APIError:
    """An exception from the engine as the answer to give the client."""
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


def failed_in_engine(request_id: str) -> APIError:
    """finish_reason "error": the engine failed the request (vLLM's server
    answers 500 too; retrying may succeed, e.g. after a multimodal cache miss)."""
    logger.warning("%s: the engine ended the request with an error", request_id)
    return APIError(500, "the engine failed on this request; retrying may succeed", code="engine_error")


async def unless_disconnected(request: Request, work: Any) -> Any:
    """`await work`, cancelled (499) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
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


async def disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Call:
    """One engine request in flight: runs it, measures it, settles it.
    Subclasses shape the answer (`complete`: one body; `stream`: SSE lines)."""

    def __init__(self, state: GatewayState, engine_input: Any, prompt_ids: list[int], params: Any, *,
                 request_id: str, response_id: str, n: int, preset: str, return_kept: bool = False,
                 priority: int = 0, session_id: str | None = None,
                 image_sizes: tuple[tuple[int, int], ...] = ()) -> None:
        self.state, self.engine_input, self.prompt_ids, self.params = state, engine_input, prompt_ids, params
        self.image_sizes = image_sizes  # (height, width) of each image in the prompt, in order
        self.request_id = request_id  # the engine's: unique whatever the client sends
        self.response_id = response_id  # what the client sees
        self.n, self.preset, self.return_kept = n, preset, return_kept  # preset: a closed set (metrics)
        self.priority, self.session_id = priority, session_id
        self.created = int(time.time())
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.generated = [0] * n
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

    def on_tokens(self, count: int) -> None:
        """`count` new tokens arrived: time to first token, inter-token latency."""
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
            if report.reused:
                metrics.REUSED.labels(self.preset).inc()
                metrics.REUSED_TOKENS.labels(self.preset).inc(report.reused.tokens)
                if report.reused.added:
                    metrics.ADDED_BACK.labels(self.preset).inc()
            if report.united:
                metrics.UNITED.labels(self.preset).inc()

    def engine_report(self, final: Any) -> FeatherReport | None:
        """The engine's report of a finished request (None before it finished)."""
        report = report_of(final)
        if report is None:
            return None
        return build_report(report, return_kept=self.return_kept)

    def usage(self) -> Usage:
        completion = sum(self.generated)
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=completion,
                     total_tokens=len(self.prompt_ids) + completion)

    def shutdown_error(self) -> APIError:
        return APIError(503, "the server shut down before the answer was complete; retry on another instance",
                        code="server_shutdown", headers={"Retry-After": "5"})

    def generate(self) -> Any:
        """The engine's output stream of this request."""
        if self.shutdown_aborted:  # aborted at shutdown before the engine had it
            raise self.shutdown_error()
        return self.state.engine.generate(self.engine_input, self.params, self.request_id,
                                          priority=self.priority, session_id=self.session_id)

    async def run_to_end(self) -> Any:
        """The engine's final output, tokens counted as they come; engine
        failures, shutdown aborts and finish_reason "error" as APIErrors."""
        final = None
        self.started = True
        try:
            async for final in self.generate():
                for out in final.outputs:
                    self.on_tokens(len(out.token_ids) - self.generated[out.index])
                    self.generated[out.index] = len(out.token_ids)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("engine failed on %s", self.request_id)
            raise engine_error(e) from None
        self.finished = final is not None and final.finished
        if self.shutdown_aborted:
            raise self.shutdown_error()
        if any(o.finish_reason == "error" for o in final.outputs):
            raise failed_in_engine(self.request_id)
        self.report = self.engine_report(final)
        return final

    async def complete(self) -> BaseModel:
        """The whole answer (one JSON body)."""
        raise NotImplementedError

    def stream(self, request: Request) -> AsyncIterator[str]:
        """The answer as server-sent events; settles the call when done."""
        raise NotImplementedError


class Answer(Protocol):
    """What answers a request: a `Call`, or several answered as one."""

    state: GatewayState
    request_id: str

    async def complete(self) -> BaseModel: ...

    def stream(self, request: Request) -> AsyncIterator[str]: ...

    async def close(self) -> None: ...


class EventStream(StreamingResponse):
    """SSE response that always settles its request: however the response
    ends (finished, client gone, never started), the engine request is
    aborted if unfinished and the admission slot is released."""

    def __init__(self, call: Answer, request: Request) -> None:
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


async def respond(call: Answer, request: Request, stream: bool) -> Response:
    """The call's answer: an event stream, or one body. A client that
    leaves before the body is ready cancels the request (and frees its KV)."""
    if stream:
        return EventStream(call, request)
    work = asyncio.ensure_future(call.complete())
    gone = asyncio.ensure_future(disconnected(request))
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
