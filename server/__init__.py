"""OpenAI-compatible FastAPI gateway for feather-vllm."""
