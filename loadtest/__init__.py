"""Load generation and benchmarks for feather-vllm (and any OpenAI-compatible server)."""
