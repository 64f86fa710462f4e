"""Request bodies parsed off the event loop.

FastAPI parses a JSON body with `await request.json()` on the event loop: a
request carrying a large data-URL image (megabytes of JSON) would hold every
other request, /health included, for tens of milliseconds. Routes of the
gateway parse it in a worker thread instead (FastAPI's custom Request /
APIRoute pattern); validation by the schema is unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

SMALL_BODY = 64 * 1024  # below this, parsing is quicker than a thread hop


class OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = json.loads(body) if len(body) < SMALL_BODY else await asyncio.to_thread(json.loads, body)
        return self._json


class OffLoopRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def off_loop_handler(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return off_loop_handler
