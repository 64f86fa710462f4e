"""Prometheus metrics of the gateway (namespace `feather_`). vLLM's own
engine metrics (`vllm:*`) live in the same registry and are served with them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Buckets that fit LLM serving on CPUs and GPUs alike: 5 ms .. 2 min.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 120.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)

REQUESTS = Counter("feather_requests", "Chat completion requests by HTTP status and preset",
                   ["status", "preset"])
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
RUNNING = Gauge("feather_requests_running", "Requests generating tokens")
WAITING = Gauge("feather_requests_waiting", "Requests accepted and waiting for their first token")
