"""OpenAI-compatible FastAPI gateway for feather-vllm."""

import os as _os

# A process the gateway started (its vLLM engine core) watches its parent and
# exits when the gateway dies, however it dies: see server/lifecycle.py.
# Forked children start the watch from an at-fork hook; spawned ones here when
# they import this package (multiprocessing re-imports a script main module,
# e.g. feather-server's, though not `python -m server`'s: the reaper process
# of server/lifecycle.py covers every case).
if _os.environ.get("FEATHER_GATEWAY_PID") not in (None, str(_os.getpid())):
    from server import lifecycle as _lifecycle

    _lifecycle.watch_parent()
