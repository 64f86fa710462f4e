"""What pruning did to recent requests, kept in the process that ran them.

The model writes a summary per request in the worker process; the runner
hook ships new summaries to the scheduler's process with the step's output
(`drain_new`), and the scheduler attaches each to its finished request's
output, so servers report the exact kept tokens instead of the method's
bounds.
"""

from __future__ import annotations

import collections
from typing import Any

_LIMIT = 512
_records: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
_new: dict[str, dict[str, Any]] = {}  # written here since the last drain_new()


def put(request_id: str, summary: dict[str, Any], new: bool = True) -> None:
    if new:
        _new[request_id] = summary
    _records[request_id] = summary
    _records.move_to_end(request_id)
    while len(_records) > _LIMIT:
        _records.popitem(last=False)


def get(request_id: str) -> dict[str, Any] | None:
    """By the engine's request id, or by the caller's id (vLLM appends a
    random suffix to it)."""
    if request_id in _records:
        return _records[request_id]
    for key in reversed(_records):
        if key.rsplit("-", 1)[0] == request_id:
            return _records[key]
    return None


def drain_new() -> dict[str, dict[str, Any]]:
    """Summaries written since the last call (to ship to another process)."""
    global _new
    out, _new = _new, {}
    return out


def clear() -> None:
    """Forget everything (a new engine in this process starts its own ids)."""
    _records.clear()
    _new.clear()
