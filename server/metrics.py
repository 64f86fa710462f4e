"""Prometheus metrics of the gateway (namespace `feather_`). vLLM's own
engine metrics (`vllm:*`) live in the same registry and are served with them.
The KV demand gauges (the autoscaling signal) are computed at each scrape:
server/kv_demand.py."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from feather_vllm.pruning.config import PRESETS

# Buckets that fit LLM serving on CPUs and GPUs alike: 5 ms .. 2 min.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 120.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)

# Every label value comes from a closed set, never from request contents:
# `preset` is a known preset name, "custom" (explicit stages), "default" (the
# request named none), "invalid" (its pruning settings were refused) or
# "unknown" (answered before its body was read: 401, 413, schema errors...);
# `status` is a status code this server sends; `handler` one of HANDLERS.
REQUESTS = Counter("feather_requests", "Chat completion responses by HTTP status and preset (every response, "
                   "errors included)", ["status", "preset"])
HANDLERS = {"/v1/chat/completions": "chat_completions", "/v1/models": "models", "/health": "health",
            "/metrics": "metrics", "/ping": "ping", "/version": "version", "/tokenize": "tokenize",
            "/detokenize": "detokenize", "/live": "live",
            "/v1/completions": "completions", "/v1/responses": "responses"}
HTTP_RESPONSES = Counter("feather_http_responses", "HTTP responses of every endpoint by handler and status",
                         ["handler", "status"])
TTFT = Histogram("feather_time_to_first_token_seconds", "Time to first token", ["preset"], buckets=_LATENCY)
ITL = Histogram("feather_inter_token_latency_seconds", "Time between streamed tokens", ["preset"],
                buckets=_TOKEN_LATENCY)
E2E = Histogram("feather_request_duration_seconds", "End-to-end request latency", ["preset"], buckets=_LATENCY)
PROMPT_TOKENS = Counter("feather_prompt_tokens", "Prompt tokens processed", ["preset"])
GENERATION_TOKENS = Counter("feather_generation_tokens", "Tokens generated", ["preset"])
IMAGE_TOKENS = Counter("feather_image_tokens", "Image tokens in prompts", ["preset"])
IMAGE_TOKENS_KEPT = Counter("feather_image_tokens_kept", "Image tokens kept (at most) after each cut",
                            ["preset", "layer"])
KV_BLOCKS_USED = Counter("feather_kv_blocks_used", "KV blocks reserved by requests", ["preset"])
KV_BLOCKS_UNPRUNED = Counter("feather_kv_blocks_unpruned", "KV blocks the same requests would hold unpruned",
                             ["preset"])
FALLBACKS = Counter("feather_pruning_fallbacks", "Requests that asked for pruning and ran unpruned", ["reason"])
REUSED = Counter("feather_pruned_kv_reuses", "Follow-up turns that reused an earlier turn's pruned image KV",
                 ["preset"])
REUSED_TOKENS = Counter("feather_pruned_kv_reused_tokens", "Prompt tokens those turns took from the prefix cache",
                        ["preset"])
ADDED_BACK = Counter("feather_pruned_added_back", "Follow-up turns that reused an earlier turn's pruned image KV and "
                     "added back image tokens it dropped (follow_up add_back; counted in the reuses too)", ["preset"])
UNITED = Counter("feather_pruned_kept_both", "Follow-up turns whose cut kept an earlier turn's kept image tokens too "
                 "(follow_up keep_both)", ["preset"])
RUNNING = Gauge("feather_requests_running", "Requests generating tokens")
DRAINING = Gauge("feather_draining", "1 while the gateway drains for shutdown (new requests refused, admitted "
                 "ones finishing), else 0")
# `reason`: "timeout" (--shutdown-timeout passed) or "signal" (a second SIGTERM).
SHUTDOWN_ABORTS = Counter("feather_shutdown_aborted_requests", "Chat completions aborted at shutdown, unfinished",
                          ["reason"])
for _reason in ("timeout", "signal"):
    SHUTDOWN_ABORTS.labels(_reason)  # both series exist (at 0) from the start
WAITING = Gauge("feather_requests_waiting", "Requests accepted and waiting for their first token")


def request_preset_label(feather: Any) -> str:
    """The `preset` label of a request's `feather` settings (schemas.FeatherSettings or None)."""
    if feather is None or (feather.preset is None and feather.stages is None):
        return "default"
    if feather.stages is not None:
        return "custom"
    return feather.preset if feather.preset in PRESETS else "invalid"


def config_label(config: Any, feather: Any) -> str:
    """The `preset` label of a resolved pruning config: a preset's name, or
    "custom" when the request gave stages (whatever name it gave them)."""
    if feather is not None and feather.stages is not None:
        return "custom"
    return config.name if config.name in PRESETS else "custom"


_SCOPE_KEY = "feather.metrics"


def set_preset_label(scope: dict, label: str) -> None:
    """Tell the response counter (middleware) the request's preset label."""
    labels = scope.get(_SCOPE_KEY)
    if labels is not None:
        labels["preset"] = label


class ResponseCounter:
    """ASGI middleware, outermost: counts every response by status, those
    answered by other middleware (401, 413, 429) and unexpected exceptions
    (500) included."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import asyncio

        labels: dict[str, str | None] = {"preset": None}
        scope[_SCOPE_KEY] = labels
        status: int | None = None

        async def counted_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except asyncio.CancelledError:
            status = status or 499
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            code = str(status or 500)
            path = scope.get("path", "")
            HTTP_RESPONSES.labels(HANDLERS.get(path, "other"), code).inc()
            if path == "/v1/chat/completions":
                REQUESTS.labels(code, labels["preset"] or "unknown").inc()
