"""python -m server --model DIR [gateway flags] [vLLM engine flags] (see --help)."""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    # Before vLLM is imported (parsing its flags imports it): models load from
    # local directories, and the pruning hooks live in the V1 model runner; V2
    # is vLLM's GPU default (feather_vllm/kv/guards.py refuses it with this
    # variable named). The KV budget is vLLM's: --gpu-memory-utilization on
    # GPUs, --kv-cache-memory-bytes or VLLM_CPU_KVCACHE_SPACE on CPUs.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from server.settings import parse_args

    args = parse_args(argv)
    settings = args.settings
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import signal

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

    level = settings.log_level.lower()  # vLLM's --log-level names are upper case; NOTSET is uvicorn's "trace"
    app = create_app(settings, stop_server, args.engine_args)

    class Server(uvicorn.Server):
        """SIGTERM drains (server.app.Drain: admitted requests finish within
        --shutdown-timeout, a second SIGTERM aborts them), then the server
        stops and the process exits 0. Uvicorn's own handling would close
        the connections at once and re-raise SIGTERM after its shutdown (exit
        -15). SIGINT (Ctrl-C) stays uvicorn's: a quick stop."""

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM:
                app.state.drain.request()
            else:
                super().handle_exit(sig, frame)

    # Once drained, the streams have ended: uvicorn's grace period only covers idle connections.
    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                   log_level="trace" if level == "notset" else level,
                                   timeout_graceful_shutdown=5))
    server.run()
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    main()
