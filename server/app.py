"""The FastAPI application: engine lifespan, routes, error handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI

from server import errors, kv_demand, lifecycle, metrics, routes
from server.auth import Auth
from server.engine import DEFAULT_SHUTDOWN_TIMEOUT_S, build_engine_args, engine_layout, start_engine
from server.settings import Settings
from server.state import GatewayState

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

logger = logging.getLogger("server")

ENGINE_POLL_S = 1.0
DRAIN_POLL_S = 0.1
ABORT_GRACE_S = 10.0  # after the drain: time for aborted requests to send their last chunk


class Drain:
    """Graceful shutdown (SIGTERM; `python -m server` calls `request`).
    At once: /health answers 503 (load balancers stop routing here) and new
    requests get 503 with Retry-After; admitted requests, streamed or not,
    run to the end. When none is left, or after --shutdown-timeout seconds,
    or at a second SIGTERM, those still running are aborted (a stream ends
    with finish_reason "abort" and an error event) and the server is told to
    stop (`stop_server(0)`): uvicorn closes its connections, the lifespan
    stops the engine, the process exits 0."""

    def __init__(self, state: GatewayState, stop_server: Callable[[int], None] | None) -> None:
        self.state, self.stop_server = state, stop_server
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the lifespan
        self.task: asyncio.Task | None = None
        self.forced = False

    def request(self) -> None:
        """Begin the drain; a second call ends it (aborting what is left).
        Safe from a signal handler."""
        if self.loop is None:  # before the app started: nothing to drain
            if self.stop_server is not None:
                self.stop_server(0)
            return
        self.loop.call_soon_threadsafe(self._on_request)

    def _on_request(self) -> None:
        if self.task is None:
            self.task = self.loop.create_task(self._run())
        elif not self.forced:
            logger.warning("shutdown requested again: aborting the %d request(s) left", self.state.in_flight)
            self.forced = True

    async def _run(self) -> None:
        state, loop = self.state, asyncio.get_running_loop()
        state.draining = True
        metrics.DRAINING.set(1)
        timeout = state.shutdown_timeout
        logger.info("shutting down: refusing new requests, draining %d request(s) for up to %s s "
                    "(--shutdown-timeout)", state.in_flight, timeout)
        deadline = loop.time() + timeout
        while state.in_flight and not self.forced and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if state.in_flight:
            reason = "signal" if self.forced else "timeout"
            logger.warning("shutdown (%s): aborting %d unfinished request(s)", reason, state.in_flight)
            grace = loop.time() + ABORT_GRACE_S
            while state.in_flight and loop.time() < grace:
                # Again each round: a request admitted (rendering) when the last round ran.
                for call in list(state.calls):
                    await call.abort_for_shutdown(reason)
                await asyncio.sleep(DRAIN_POLL_S)
        logger.info("drained; stopping")
        if self.stop_server is not None:
            self.stop_server(state.exit_code or 0)


def create_app(settings: Settings, stop_server: Callable[[int], None] | None = None,
               engine_args: AsyncEngineArgs | None = None) -> FastAPI:
    """The gateway app; the engine starts in the background so that /health
    answers 503 while it loads. `engine_args`: the engine's arguments, with
    the overrides applied (`server.settings.parse_args` makes them; default:
    vLLM's defaults for `settings.model`).

    `stop_server(exit_code)` is called when the engine fails to start or
    dies: the process should then stop with that (non-zero) code, so that
    its orchestrator restarts it (python -m server does). Without it the
    app keeps answering 503."""
    state = GatewayState(settings)
    state.shutdown_timeout = float(engine_args.shutdown_timeout if engine_args is not None
                                   and engine_args.shutdown_timeout is not None else DEFAULT_SHUTDOWN_TIMEOUT_S)
    drain = Drain(state, stop_server)
    kv_demand.COLLECTOR.state = state  # the KV demand gauges read this app's requests (the latest app's)

    def fatal(reason: str) -> None:
        state.exit_code = lifecycle.ENGINE_DIED_EXIT_CODE
        if stop_server is None:
            logger.critical("%s: answering 503 from now on", reason)
            return
        logger.critical("%s: stopping the gateway (exit code %d)", reason, state.exit_code)
        stop_server(state.exit_code)

    async def _start() -> None:
        try:
            args = engine_args if engine_args is not None else build_engine_args(
                settings.model, settings.default_preset, settings.kv_boundaries)
            engine = await asyncio.to_thread(start_engine, args)
            state.attach(engine, engine_layout(engine))
            logger.info("engine ready: %s", settings.model)
        except Exception as e:  # noqa: BLE001 - reported by /health
            logger.exception("engine failed to start")
            # One line for orchestrator logs (vLLM's validation errors span several).
            state.start_error = " ".join(f"{type(e).__name__}: {e}".split())[:1000]
            fatal(f"the engine failed to start: {state.start_error}")
            return
        # vLLM's client notices a dead engine core (its process sentinel) and
        # marks the engine errored; the gateway then has nothing to serve.
        while not getattr(engine, "errored", False):
            await asyncio.sleep(ENGINE_POLL_S)
        fatal("the engine died")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        drain.loop = asyncio.get_running_loop()
        starter = asyncio.create_task(_start())
        yield
        metrics.DRAINING.set(0)
        starter.cancel()
        state.images.close()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="feather-vllm", lifespan=lifespan)
    app.state.gateway = state
    app.state.drain = drain  # drain.request(): graceful shutdown (SIGTERM)

    # Outermost last: the response counter sees every answer, including the
    # 401/429 of auth (checked before the body is read) and the 413 of the body limit.
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Auth, keys=settings.api_keys, max_per_key=settings.max_requests_per_key)
    app.add_middleware(metrics.ResponseCounter)
    errors.install(app)
    app.include_router(routes.router)
    return app
