"""The gateway and its engine live and die together, with the real engine:
SIGKILL of the gateway (what the OOM killer does) leaves no process of it
behind after 10 s, and a dead engine makes the gateway exit non-zero (so
that its orchestrator restarts it) instead of answering 503 forever.

Each test kills its server, so each starts its own (tiny checkpoint)."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from server.lifecycle import ENGINE_DIED_EXIT_CODE
from tests.helpers import ServerProcess


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def gateway(tiny_checkpoint):
    server = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny")
    yield server
    server.stop()
    for proc in getattr(server, "descendants", []):  # whatever a failing test left
        if _running(proc):
            proc.kill()


def test_no_process_left_10s_after_sigkill_of_the_gateway(gateway):
    descendants = psutil.Process(gateway.proc.pid).children(recursive=True)
    gateway.descendants = descendants
    names = " ".join(p.name() for p in descendants)
    assert "EngineCore" in names, names  # the engine runs in its own process
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(5)
    killed_at = time.monotonic()
    while any(_running(p) for p in descendants) and time.monotonic() - killed_at < 10:
        time.sleep(0.1)
    left = [(p.pid, p.name()) for p in descendants if _running(p)]
    assert not left, f"still running 10 s after the gateway was killed: {left}"
    assert "is gone; stopping its process" in gateway.logs()


def test_gateway_exits_nonzero_when_its_engine_dies(gateway):
    engine = next(p for p in psutil.Process(gateway.proc.pid).children(recursive=True)
                  if "EngineCore" in p.name())
    gateway.descendants = psutil.Process(gateway.proc.pid).children(recursive=True)
    engine.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    code = gateway.proc.wait(30)
    assert code == ENGINE_DIED_EXIT_CODE, gateway.logs()[-2000:]
    assert time.monotonic() - killed_at < 15
    assert "the engine died: stopping the gateway" in gateway.logs()
