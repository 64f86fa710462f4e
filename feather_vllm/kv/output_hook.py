"""Attach each finished request's pruning record to its output (vLLM
internals, pinned version).

`Scheduler.update_from_output` receives the step's ModelRunnerOutput, which
carries the records the worker wrote (`feather_records`, see runner_hook).
`Scheduler._free_request` returns the `kv_transfer_params` that vLLM passes
to `RequestOutput.kv_transfer_params`; when no KV connector uses it, it
carries `{"feather": record}` to the caller.
"""

from __future__ import annotations

import functools

from feather_vllm import records


def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_feather_patched", False):
        return
    Scheduler._feather_patched = True
    original = Scheduler._free_request

    @functools.wraps(original)
    def _free_request(self, request, *args, **kwargs):
        kv_params, ec_params = original(self, request, *args, **kwargs)
        record = records.get(request.request_id)
        if kv_params is None and record is not None:
            kv_params = {"feather": record}
        return kv_params, ec_params

    Scheduler._free_request = _free_request

    original_update = Scheduler.update_from_output

    @functools.wraps(original_update)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        for request_id, record in (getattr(model_runner_output, "feather_records", None) or {}).items():
            records.put(request_id, record, new=False)
        return original_update(self, scheduler_output, model_runner_output, *args, **kwargs)

    Scheduler.update_from_output = update_from_output
