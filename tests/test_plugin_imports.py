"""The plugin's import path stays light: what vLLM loads never imports the
tools (feather_vllm.tools) nor their `tools` extra (matplotlib, tqdm).

Each case runs in a fresh interpreter, so modules other tests imported do
not hide what the plugin imports itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# vLLM's own path: `vllm.general_plugins` entry points loaded and called
# (feather_vllm.register), then the modules the registered architecture and
# the engine settings live in. vLLM itself imports tqdm, so only matplotlib
# and the tools are checked here.
_PLUGIN = """
from vllm import ModelRegistry
from vllm.plugins import load_general_plugins

load_general_plugins()
import feather_vllm
assert feather_vllm.ARCHITECTURE in ModelRegistry.get_supported_archs(), "plugin not registered"
import feather_vllm.engine
import feather_vllm.model
"""

# The vLLM-free modules (the pruning algorithm, the typed plan/report) pull
# in neither vLLM nor the tools' dependencies, and import with the `tools`
# extra absent (blocked below: torch.hub's optional `import tqdm` would
# otherwise load it whenever it is installed).
_LIGHT = """
import feather_vllm
import feather_vllm.kv.plan
import feather_vllm.pruning
import feather_vllm.pruning.config
"""

_BLOCK = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
"""

_REPORT = """
import json
forbidden = {forbidden!r}
print("LOADED=" + json.dumps(sorted(
    m for m, mod in sys.modules.items()
    if mod is not None and any(m == f or m.startswith(f + ".") for f in forbidden))))
"""

CASES = [
    pytest.param(_PLUGIN, (), ("matplotlib", "feather_vllm.tools"), {"VLLM_PLUGINS": "feather"},
                 id="vllm-loads-plugin"),
    pytest.param(_LIGHT, ("tqdm", "matplotlib"), ("matplotlib", "tqdm", "vllm", "feather_vllm.tools"), {},
                 id="pruning-and-plan-without-vllm"),
]


@pytest.mark.parametrize(("code", "blocked", "forbidden", "env"), CASES)
def test_plugin_import_path_leaves_out_the_tools(code, blocked, forbidden, env):
    script = _BLOCK.format(blocked=list(blocked)) + code + _REPORT.format(forbidden=list(forbidden))
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED=")]
    assert json.loads(line.removeprefix("LOADED=")) == []


def test_evaluation_runs_under_its_short_name():
    """`python -m feather_vllm.evaluate` is the tools' evaluation."""
    proc = subprocess.run([sys.executable, "-m", "feather_vllm.evaluate", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("usage: python -m feather_vllm.tools.evaluate")
    assert "What each pruning setting costs in localization accuracy" in proc.stdout
