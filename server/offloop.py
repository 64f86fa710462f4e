"""Request bodies parsed off the event loop.

FastAPI parses a JSON body with `await request.json()` on the event loop: a
request carrying a large data-URL image (megabytes of JSON) would hold every
other request, /health included, for tens of milliseconds. Routes of the
gateway parse it in a worker thread instead (FastAPI's custom Request /
APIRoute pattern); validation by the schema is unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

SMALL_BODY = 64 * 1024  # below this, parsing is quicker than a thread hop
# One worker thread for large bodies: joining (~17 ms for 20 MB here) and
# json.loads (~30 ms, GIL held throughout) of bodies that arrive together
# would otherwise run back to back in one event-loop turn (or take turns
# holding the GIL), stalling /health for hundreds of milliseconds.
_LARGE_BODIES = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="large-body")


class OffLoopJSONRequest(Request):
    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            chunks = [chunk async for chunk in self.stream()]
            if sum(map(len, chunks)) < SMALL_BODY:
                self._body = b"".join(chunks)
            else:
                self._body = await asyncio.get_running_loop().run_in_executor(_LARGE_BODIES, b"".join, chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) < SMALL_BODY:
                self._json = json.loads(body)
            else:
                self._json = await asyncio.get_running_loop().run_in_executor(_LARGE_BODIES, json.loads, body)
        return self._json


class OffLoopRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def off_loop_handler(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return off_loop_handler
