"""The only package that touches vLLM internals (pinned: vLLM 0.32.0, the
V1 model runner): KV specs and managers per pruning stage, the scheduler's
one decision and its typed plan, the runner hooks that carry plans and
kept tokens, and every rewrite of attention metadata and slot mappings.

`install()` is called from the plugin entry point in every vLLM process;
every hook is inert unless the FEATHER architecture is loaded.
"""

from __future__ import annotations

VLLM_VERSION = "0.32.0"


def install() -> None:
    """Install the KV-manager, scheduler and runner hooks (idempotent)."""
    from feather_vllm.kv import runner_hook, scheduler_hook, specs

    specs.register_spec()
    scheduler_hook.install()
    runner_hook.install()
