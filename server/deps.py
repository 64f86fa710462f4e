"""What every endpoint shares: the gateway state, the key and engine
dependencies, the served-model check, body validation and the unknown-field
policy (--lenient-fields)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from server.auth import UNAUTHORIZED, key_index
from server.errors import APIError
from server.state import GatewayState

logger = logging.getLogger("server")


def state_of(request: Request) -> GatewayState:
    """The gateway's state (one per app)."""
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
    """503 unless the engine is ready and the server is not draining."""
    if not state.ready:
        raise not_ready_error(state)


def check_model(name: str | None, state: GatewayState) -> None:
    """404 unless `name` is the served model's name (None: not given, fine)."""
    served = state.settings.model_name
    if name is not None and name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def validated(model: Any, body: dict[str, Any]) -> Any:
    """`body` as `model`, refused like a chat completion body when invalid."""
    from pydantic import ValidationError

    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def check_unknown_fields(extra: dict[str, Any] | None, state: GatewayState, where: str = "",
                         prefix: str = "") -> None:
    """Fields the gateway does not know: 400 naming the first (`prefix`
    locates it, e.g. "messages[0]."), or, with --lenient-fields, ignored
    with a warning (as vLLM ignores them)."""
    if not extra:
        return
    if state.settings.lenient_fields:
        logger.warning("%sfields ignored (unknown, --lenient-fields): %s", where, sorted(prefix + k for k in extra))
        return
    name = prefix + next(iter(extra))
    raise APIError(400, f"unknown field {name!r} (a server started with --lenient-fields ignores unknown fields)",
                   param=name, code="unknown_parameter")


def unencodable(value: Any, path: str = "") -> str | None:
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
        found = unencodable(sub, sub_path)
        if found:
            return found
    return None
