"""The only package that touches vLLM internals (vLLM 0.32 and 0.33, the
V1 model runner; `seam_table.py` holds the contract and the supported
range, `seams.py` checks it): KV specs and managers per pruning stage
(`specs`), the scheduler's one decision and its typed plan
(`scheduler_hook`, `plan`), the model-runner seam (`runner_v1`), and every
rewrite of attention metadata and slot mappings (`step`,
`decode_metadata`, runner-agnostic).

`install()` is called from the plugin entry point in every vLLM process
once `seams` accepted the installed vLLM; every hook is inert unless the
FEATHER architecture is loaded.
"""

from __future__ import annotations


def install() -> None:
    """Install the KV-manager, scheduler and runner hooks (idempotent)."""
    from feather_vllm.kv import runner_v1, scheduler_hook, specs

    specs.register_spec()
    scheduler_hook.install()
    runner_v1.install()
