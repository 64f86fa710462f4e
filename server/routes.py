"""The gateway's HTTP surface: every endpoint module's router in one, and
the small endpoints (models, health and liveness, metrics, vLLM's /version
and /ping, the refusal of /v1/responses). Each endpoint family lives in its
own module: server/chat.py, server/completions.py, server/tokenize.py."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import chat, completions, tokenize
from server.deps import require_key, state_of
from server.errors import APIError, error_body
from server.offloop import OffLoopRoute
from server.state import GatewayState

router = APIRouter(route_class=OffLoopRoute)  # JSON bodies parsed in a worker thread


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
async def list_models(state: GatewayState = Depends(state_of)) -> dict[str, Any]:
    """vLLM's own model list (its protocol classes), for the served model."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, ModelPermission

    context = state.layout.max_model_len if state.layout is not None else None
    card = ModelCard(id=state.settings.model_name, created=state.started, max_model_len=context,
                     root=state.settings.model, permission=[ModelPermission()])
    return ModelList(data=[card]).model_dump(exclude_none=True)


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


@router.api_route("/v1/responses", methods=["GET", "POST", "DELETE"], dependencies=[Depends(require_key)])
@router.api_route("/v1/responses/{rest:path}", methods=["GET", "POST", "DELETE"], dependencies=[Depends(require_key)])
async def responses() -> Response:
    """vLLM serves OpenAI's Responses API; this gateway does not (yet): a
    404 that says so, rather than a bare "Not Found"."""
    raise APIError(404, "/v1/responses (OpenAI's Responses API) is not served by this server; use "
                        "/v1/chat/completions or /v1/completions", code="endpoint_not_served")


router.include_router(chat.router)
router.include_router(completions.router)
router.include_router(tokenize.router)
