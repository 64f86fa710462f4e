"""python -m server --model DIR [--host H] [--port P] ... (see --help)."""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    from server.settings import parse_args

    settings = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's CPU platform lets this variable override the KV budget we set.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    # The pruning hooks live in the V1 model runner; V2 is vLLM's GPU default
    # (feather_vllm/kv/guards.py refuses it with this variable named).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from server import lifecycle
    from server.app import create_app

    # The engine core (a child process) exits when this process dies, by any signal.
    lifecycle.mark_gateway()
    server: uvicorn.Server | None = None
    exit_code = 0

    def stop_server(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        if server is not None:
            server.should_exit = True  # graceful shutdown, then exit with `code`

    server = uvicorn.Server(uvicorn.Config(create_app(settings, stop_server), host=settings.host,
                                           port=settings.port, log_level=settings.log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    main()
