"""The FastAPI application: engine lifespan, routes, error handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI

from server import errors, lifecycle, metrics, routes
from server.auth import Auth
from server.engine import build_engine_args, engine_layout, start_engine
from server.settings import Settings
from server.state import GatewayState

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs

logger = logging.getLogger("server")

ENGINE_POLL_S = 1.0


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
        starter = asyncio.create_task(_start())
        yield
        starter.cancel()
        state.images.close()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="feather-vllm", lifespan=lifespan)
    app.state.gateway = state

    # Outermost last: the response counter sees every answer, including the
    # 401/429 of auth (checked before the body is read) and the 413 of the body limit.
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Auth, keys=settings.api_keys, max_per_key=settings.max_requests_per_key)
    app.add_middleware(metrics.ResponseCounter)
    errors.install(app)
    app.include_router(routes.router)
    return app
