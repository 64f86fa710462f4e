"""python -m server --model DIR [--host H] [--port P] ... (see --help)."""

from __future__ import annotations

import logging
import os


def main(argv: list[str] | None = None) -> None:
    from server.settings import parse_args

    settings = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's CPU platform lets this variable override the KV budget we set.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from server.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
