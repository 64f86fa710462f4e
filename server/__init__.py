"""OpenAI-compatible FastAPI gateway for feather-vllm."""

import os as _os

# A process the gateway started (its vLLM engine core) watches its parent and
# exits when the gateway dies, however it dies: see server/lifecycle.py.
# Spawned children import this package first (multiprocessing re-imports the
# gateway's main module, server.__main__).
if _os.environ.get("FEATHER_GATEWAY_PID") not in (None, str(_os.getpid())):
    from server import lifecycle as _lifecycle

    _lifecycle.watch_parent()
