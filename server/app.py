"""The FastAPI application: engine lifespan, routes, error handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

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

    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    errors.install(app)
    app.include_router(routes.router)
    return app
