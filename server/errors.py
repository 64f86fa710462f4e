"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def stream_error_event(err: APIError) -> str:
    """`err` as an event of a stream whose headers are sent (in-band, as vLLM's server does)."""
    return f"data: {json.dumps(error_body(err.status, err.message, code=err.code))}\n\n"


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, headers=err.headers)


# Union-member tags pydantic puts in error locations; not field names.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_PART_TAGS = {"text", "image_url"}  # discriminator values right after a list index


def validation_param(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "role")` -> "messages[0].role"."""
    out = ""
    after_index = False
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            out += f"[{p}]"
            after_index = True
            continue
        tag = p in _TYPE_TAGS or "[" in str(p) or str(p).startswith("constrained-")
        if not (tag or (after_index and p in _PART_TAGS)):
            out += ("." if out else "") + str(p)
        after_index = False
    return out or None


class BodyLimit:
    """ASGI middleware: request bodies over `limit` bytes get 413, whether
    announced by Content-Length or sent chunked without one (counted as
    they arrive, so an oversized body is never held in memory)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = JSONResponse(error_body(413, f"request body is {int(length)} bytes; the limit is "
                                                    f"{self.limit}"), 413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPExceptions from body reading; the handler below answers it.
                    raise HTTPException(413, f"request body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def install(app: FastAPI) -> None:
    """Every error leaves the server as OpenAI error JSON with a fitting status."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        # With unions pydantic reports every branch; the deepest error is the useful one.
        # Prefer a branch's real complaint (too long, out of range) over another
        # branch's type mismatch, e.g. for `stop`: str | list[str].
        first = max(err.errors(), key=lambda e: (not str(e.get("type", "")).endswith("_type"), len(e.get("loc", ()))),
                    default={"loc": (), "msg": "invalid request"})
        param = validation_param(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
            param = None
        else:
            message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(400, message, param, first.get("type")), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)), err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(err).__name__}"), 500)
