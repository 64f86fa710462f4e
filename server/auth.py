"""API keys, checked in ASGI middleware before the request body is read.

A request to /v1/*, /version, /tokenize or /detokenize without a valid `Authorization: Bearer <key>` gets 401
without the server reading (or parsing) a byte of its body. With several
keys (one per client) and `max_requests_per_key`, each key may have at most
that many (chat) completions in flight (429 beyond, also before the body).
"""

from __future__ import annotations

import secrets
from collections import defaultdict

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_body

PROTECTED_PREFIX = "/v1/"
PROTECTED_PATHS = frozenset({"/version", "/tokenize", "/detokenize"})  # vLLM's, outside /v1/
LIMITED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})  # what --max-requests-per-key counts


def protected(path: str) -> bool:
    """Paths that need a key (probes, /health and /ping, and /metrics do not)."""
    return path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS
UNAUTHORIZED = "missing or invalid API key (Authorization: Bearer <key>)"


def key_index(header: str, keys: list[str]) -> int | None:
    """Which of `keys` the Authorization header carries, compared in
    constant time against every key; None if none."""
    presented = header.encode("utf-8", "surrogateescape")
    found = None
    for i, key in enumerate(keys):
        if secrets.compare_digest(presented, f"Bearer {key}".encode()) and found is None:
            found = i
    return found


class Auth:
    def __init__(self, app: ASGIApp, keys: list[str], max_per_key: int | None = None) -> None:
        self.app, self.keys, self.max_per_key = app, list(keys), max_per_key
        self.in_flight: dict[int, int] = defaultdict(int)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not protected(scope["path"]) or not self.keys:
            await self.app(scope, receive, send)
            return
        index = key_index(Headers(scope=scope).get("authorization", ""), self.keys)
        if index is None:
            response = JSONResponse(error_body(401, UNAUTHORIZED, code="invalid_api_key"), 401,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        if self.max_per_key is None or scope["path"] not in LIMITED_PATHS or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight[index] >= self.max_per_key:
            response = JSONResponse(error_body(429, f"this API key has {self.max_per_key} requests in flight; "
                                                    "retry later", code="key_concurrency_limit"), 429,
                                    headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.in_flight[index] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[index] -= 1
