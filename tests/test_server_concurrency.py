"""Load on the shared gateway (tests/server_fixtures.py): concurrent
requests answer as sequential ones, the queue beyond its limit answers 429,
and /health stays prompt during a burst of large images."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
from PIL import Image

from tests.helpers import png_data_url, sample_images
from tests.server_fixtures import AUTH, PRESETS, image_chat


def test_concurrent_mixed_presets_equal_sequential(server, client, scene_url):
    images = [png_data_url(img) for img in sample_images()[1:]]  # the noise image exceeds the byte limit
    bodies = [image_chat(images[i % 2], feather={"preset": PRESETS[i % 4]}) for i in range(8)]
    sequential = [client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"]
                  for b in bodies]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == sequential


def test_queue_full_answers_429_with_retry_after(server, scene_url):
    body = image_chat(scene_url, max_tokens=200)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(14)))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 8 and statuses.count(429) == 6, statuses  # 4 running + 4 waiting
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"


def _progressive_jpeg(seed: int) -> str:
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((1000, 1000), Image.BICUBIC)  # smooth: ~100 kB as JPEG
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85, progressive=True)
    assert len(buf.getvalue()) < 150_000
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def test_health_answers_during_a_burst_of_large_images(server):
    """16 image requests at once (1000x1000 progressive JPEGs, the test
    server's pixel limit): decoding and conversion run off the event loop,
    so /health keeps answering promptly throughout."""
    import time

    # Encoded up front: the client's own JSON encoding would otherwise delay its probes.
    bodies = [json.dumps(image_chat(_progressive_jpeg(i), max_tokens=1)).encode() for i in range(16)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers={**AUTH, "content-type": "application/json"},
                                     timeout=300) as c:
            await c.get("/health")
            done = False
            latencies = []

            async def probe():
                while not done:
                    start = time.perf_counter()
                    await c.get("/health")
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.02)

            prober = asyncio.create_task(probe())
            responses = await asyncio.gather(*(c.post("/v1/chat/completions", content=b) for b in bodies))
            done = True
            await prober
            return responses, latencies

    responses, latencies = asyncio.run(run())
    assert sorted({r.status_code for r in responses}) in ([200], [200, 429])
    assert len(latencies) > 5
    # The target is 0.2 s (measured alone: 50 ms at most); the margin is for 2 cores shared with other tests.
    assert max(latencies) < 0.5, sorted(latencies)[-5:]
