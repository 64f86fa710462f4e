"""Async load generator for any OpenAI-compatible chat endpoint.

Closed loop (a fixed number of requests in flight) or open loop (Poisson
arrivals at a rate), image + text chat requests with a pruning preset or a
mix, bounded by request count and duration. Every request streams, so time
to first token and inter-token latencies are measured on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import itertools
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx


@dataclasses.dataclass
class RequestResult:
    preset: str | None
    ok: bool
    kind: str = "image"  # "image" chat or long "text" prompt (LoadConfig.kinds)
    status: int | None = None
    error: str | None = None
    start: float = 0.0  # seconds since the run started
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = dataclasses.field(default_factory=list)  # gaps between content chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    feather: dict[str, Any] | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclasses.dataclass
class LoadConfig:
    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str
    presets: Sequence[str | None] = (None,)  # cycled; None sends no `feather` field
    kinds: Sequence[str] = ("image",)  # cycled: "image" chats, or "text" prompts of `text_words` words
    text_words: int = 1500
    context_words: int = 0  # image chats: words of text before the image (a document, then the picture)
    requests: int = 32
    duration_s: float | None = None
    concurrency: int | None = 4  # closed loop
    rate: float | None = None  # open loop (requests/s, Poisson); wins over concurrency
    max_tokens: int = 32
    prompt: str = "Where is the red square?"
    image_size: int = 336
    images: Sequence[Path] = ()
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 600.0


def synthetic_image_url(size: int, seed: int) -> str:
    """A PNG data URL: one coloured square on a noisy grey background."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.normal(128, 8, (size, size, 3))
    x, y = rng.integers(0, size - size // 4, 2)
    pixels[y:y + size // 4, x:x + size // 4] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_image_url(path: Path) -> str:
    mime = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower().lstrip(".")
    return f"data:image/{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _words(n: int) -> str:
    return " ".join(f"w{i % 97}" for i in range(n))


def context_text(words: int) -> str:
    """The text an image chat with `context_words` sends before its image."""
    return f"Read this first: {_words(words)}"


def chat_body(cfg: LoadConfig, image_url: str | None, preset: str | None) -> dict[str, Any]:
    """An image chat, or (`image_url` None) a long text prompt of
    `cfg.text_words` words (1-3 tokens each, by tokenizer)."""
    if image_url is None:
        content: list[dict[str, Any]] = [{"type": "text", "text": f"Summarize: {_words(cfg.text_words)}"}]
    else:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": cfg.prompt}]
        if cfg.context_words:
            content.insert(0, {"type": "text", "text": context_text(cfg.context_words)})
    body: dict[str, Any] = {
        "model": cfg.model, "max_tokens": cfg.max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
        "messages": [{"role": "user", "content": content}],
    }
    if preset is not None:
        body["feather"] = {"preset": preset}
    return body


async def _one(client: httpx.AsyncClient, cfg: LoadConfig, body: dict[str, Any], preset: str | None,
               t0: float, kind: str = "image") -> RequestResult:
    result = RequestResult(preset=preset, ok=False, kind=kind, start=time.perf_counter() - t0)
    begin = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200].decode(errors='replace')}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    if result.ttft is None:
                        result.ttft = now - begin
                    elif last is not None:
                        result.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk.get("feather"):
                    result.feather = chunk["feather"]
        result.e2e = time.perf_counter() - begin
        result.ok = result.ttft is not None or result.output_tokens == 0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_load(cfg: LoadConfig, progress: bool = True) -> list[RequestResult]:
    """Send the load; return one result per request, in start order."""
    from tqdm import tqdm

    rng = random.Random(cfg.seed)
    if cfg.images:
        urls = [file_image_url(Path(p)) for p in cfg.images]
    else:
        urls = [synthetic_image_url(cfg.image_size, cfg.seed + i) for i in range(8)]
    presets = itertools.cycle(cfg.presets)
    kinds = itertools.cycle(cfg.kinds)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    results: list[RequestResult] = []
    bar = tqdm(total=None if cfg.duration_s else cfg.requests, desc="requests", unit="req", disable=not progress)
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration_s if cfg.duration_s else None

    def more() -> bool:
        return len(started) < cfg.requests and (deadline is None or time.perf_counter() < deadline)

    started: list[int] = []
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=cfg.timeout_s, limits=limits) as client:
        async def send() -> None:
            i = len(started)
            started.append(i)
            preset, kind = next(presets), next(kinds)
            url = urls[i % len(urls)] if kind == "image" else None
            result = await _one(client, cfg, chat_body(cfg, url, preset), preset, t0, kind)
            results.append(result)
            bar.update(1)

        if cfg.rate:
            tasks = []
            while more():
                tasks.append(asyncio.create_task(send()))
                await asyncio.sleep(rng.expovariate(cfg.rate))
            await asyncio.gather(*tasks)
        else:
            async def worker() -> None:
                while more():
                    await send()

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency or 1)))
    bar.close()
    return sorted(results, key=lambda r: r.start)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _dist(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values) if values else None,
            "p50": _pct(values, 0.5), "p90": _pct(values, 0.9), "p99": _pct(values, 0.99)}


def summarize(results: list[RequestResult], slo_ttft_s: float | None = None,
              slo_tpot_s: float | None = None) -> dict[str, Any]:
    """Latency distributions, throughput, goodput under the SLO, errors."""
    ok = [r for r in results if r.ok]
    if not results:
        return {"requests": 0}
    span = max((r.start + (r.e2e or 0)) for r in results) - min(r.start for r in results)
    span = max(span, 1e-9)
    good = [r for r in ok if (slo_ttft_s is None or (r.ttft or 0) <= slo_ttft_s)
            and (slo_tpot_s is None or (r.tpot or 0) <= slo_tpot_s)]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = str(r.status) if r.status else (r.error or "error").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results),
        "completed": len(ok),
        "duration_s": span,
        "request_throughput": len(ok) / span,
        "output_token_throughput": sum(r.output_tokens for r in ok) / span,
        "goodput": len(good) / span,
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
        "ttft_s": _dist([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": _dist([x for r in ok for x in r.itls]),
        "tpot_s": _dist([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": _dist([r.e2e for r in ok if r.e2e is not None]),
        "errors": errors,
    }


def summarize_by_preset(results: list[RequestResult], **slo: float | None) -> dict[str, Any]:
    presets = sorted({r.preset or "default" for r in results})
    return {p: summarize([r for r in results if (r.preset or "default") == p], **slo) for p in presets}
