"""The gateway and its engine live and die together.

* The engine core (a child process vLLM's AsyncLLM starts) must not outlive
  the gateway, whatever kills the gateway (SIGKILL from the OOM killer
  included, which no handler sees). Two independent guards:
  - a reaper: a small process the gateway starts (`python -m
    server.lifecycle <gateway pid>`) that records the gateway's descendants
    while it lives and, once it is gone, sends them SIGTERM and, after a
    grace period, SIGKILL; it works whatever start method vLLM uses (spawn
    here), with no hook inside vLLM's processes;
  - a parent watch inside each descendant: a thread that polls the parent
    pid and stops the process when it was re-parented. It starts in forked
    children through an at-fork hook, in spawned ones that import the
    `server` package, and wherever `watch_parent_if_gateway_child()` is
    called (e.g. from the vLLM plugin's register(), which vLLM runs in every
    process). Descendants are recognised by FEATHER_GATEWAY_PID.
* The gateway exits non-zero when its engine dies (see server/app.py), so
  that the orchestrator restarts it instead of it answering 503 forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

logger = logging.getLogger("server.lifecycle")

GATEWAY_PID_ENV = "FEATHER_GATEWAY_PID"
POLL_S = 0.25
GRACE_S = 3.0
ENGINE_DIED_EXIT_CODE = 3

_watching_pid: int | None = None  # the process whose watcher runs (fork copies this variable, not the thread)
_hook_registered = False


def mark_gateway(reaper: bool = True) -> subprocess.Popen | None:
    """In the gateway process, before the engine starts: its descendants
    will watch their parents, and (with `reaper`) a reaper process stops
    them if the gateway dies first. Returns the reaper."""
    os.environ[GATEWAY_PID_ENV] = str(os.getpid())
    _register_fork_hook()
    if not reaper:
        return None
    env = {k: v for k, v in os.environ.items() if k != GATEWAY_PID_ENV}
    return subprocess.Popen([sys.executable, "-m", "server.lifecycle", str(os.getpid())], env=env,
                            stdin=subprocess.DEVNULL)


def reap_when_gone(gateway_pid: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> int:
    """The reaper's loop: remember the gateway's descendants while it lives;
    when it has died, stop those still running. Returns how many it stopped."""
    import psutil

    me = os.getpid()
    try:
        gateway = psutil.Process(gateway_pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, psutil.Process] = {}
    while True:
        try:
            if gateway.status() == psutil.STATUS_ZOMBIE:
                break
            for child in gateway.children(recursive=True):
                if child.pid != me:
                    known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    victims = []
    for proc in known.values():
        if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:  # is_running: not a reused pid
            victims.append(proc)
    for proc in victims:
        logger.warning("gateway %d is gone; stopping its process %d (%s)", gateway_pid, proc.pid, proc.name())
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(victims, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(victims)


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


if __name__ == "__main__":  # the reaper: python -m server.lifecycle <gateway pid>
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the gateway; it goes when the gateway goes
    reap_when_gone(int(sys.argv[1]))
