"""The only package that touches vLLM internals (pinned: vLLM 0.32.0).

`install()` is called from the plugin entry point in every vLLM process.
"""

from __future__ import annotations

VLLM_VERSION = "0.32.0"


def install() -> None:
    """Install the runner and KV-manager hooks (idempotent)."""
    from feather_vllm.kv import output_hook, runner_hook, staged

    runner_hook.install()
    staged.install()
    output_hook.install()
