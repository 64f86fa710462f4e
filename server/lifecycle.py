"""The gateway and its engine live and die together.

* The engine core (a child process vLLM's AsyncLLM starts) must not outlive
  the gateway, whatever kills the gateway (SIGKILL from the OOM killer
  included, which no handler sees). Every process descended from the
  gateway runs a watcher thread that polls its parent's pid; when the parent
  is gone (the child was re-parented) it sends itself SIGTERM (vLLM's engine
  core shuts down on it) and, if still alive after a grace period, SIGKILL.
  Descendants are recognised by the FEATHER_GATEWAY_PID variable the gateway
  sets before starting the engine; the watcher starts in forked children
  through an at-fork hook, in spawned ones when they import the `server`
  package (multiprocessing's spawn re-imports the parent's main module,
  `server.__main__`), or from `watch_parent_if_gateway_child()` called by
  any code that runs in the child (e.g. the vLLM plugin's register()).
* The gateway exits non-zero when its engine dies (see server/app.py), so
  that the orchestrator restarts it instead of it answering 503 forever.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger("server.lifecycle")

GATEWAY_PID_ENV = "FEATHER_GATEWAY_PID"
POLL_S = 0.25
GRACE_S = 3.0
ENGINE_DIED_EXIT_CODE = 3

_watching_pid: int | None = None  # the process whose watcher runs (fork copies this variable, not the thread)
_hook_registered = False


def mark_gateway() -> None:
    """In the gateway process, before the engine starts: its descendants
    will watch their parents."""
    os.environ[GATEWAY_PID_ENV] = str(os.getpid())
    _register_fork_hook()


def is_gateway_descendant() -> bool:
    gateway = os.environ.get(GATEWAY_PID_ENV)
    return gateway is not None and gateway != str(os.getpid())


def watch_parent_if_gateway_child() -> None:
    """Start the parent watch in this process if it descends from a gateway
    (a no-op anywhere else, the gateway itself included; idempotent)."""
    if is_gateway_descendant():
        watch_parent()


def watch_parent(poll_s: float = POLL_S, grace_s: float = GRACE_S) -> None:
    """Exit this process soon after its parent dies (idempotent per process)."""
    global _watching_pid
    if _watching_pid == os.getpid():
        return
    _watching_pid = os.getpid()
    _register_fork_hook()  # its own forked children watch it in turn
    parent = os.getppid()
    if parent == 1:  # already orphaned
        _stop(grace_s)
        return
    threading.Thread(target=_watch, args=(parent, poll_s, grace_s), name="feather-parent-watch",
                     daemon=True).start()


def _watch(parent: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    logger.warning("parent process %d is gone; process %d exits", parent, os.getpid())
    _stop(grace_s)


def _stop(grace_s: float) -> None:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def _after_fork_in_child() -> None:
    try:
        watch_parent_if_gateway_child()
    except Exception:  # noqa: BLE001 - never break a fork
        pass


def _register_fork_hook() -> None:
    global _hook_registered
    if not _hook_registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hook_registered = True
