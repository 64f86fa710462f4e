"""The FastAPI application: engine lifespan, routes, error handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server import errors, routes
from server.engine import engine_layout, start_engine
from server.state import GatewayState
from server.settings import Settings

logger = logging.getLogger("server")


def create_app(settings: Settings) -> FastAPI:
    """The gateway app; the engine starts in the background so that /health
    answers 503 while it loads."""
    state = GatewayState(settings)

    async def _start() -> None:
        try:
            engine = await asyncio.to_thread(start_engine, settings)
            state.attach(engine, engine_layout(engine))
            logger.info("engine ready: %s", settings.model)
        except Exception as e:  # noqa: BLE001 - reported by /health
            logger.exception("engine failed to start")
            state.start_error = f"{type(e).__name__}: {e}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        starter = asyncio.create_task(_start())
        yield
        starter.cancel()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="feather-vllm", lifespan=lifespan)
    app.state.gateway = state

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse(errors.error_body(413, f"request body is {length} bytes; the limit is "
                                                       f"{settings.max_body_bytes}"), 413)
        return await call_next(request)

    errors.install(app)
    app.include_router(routes.router)
    return app
