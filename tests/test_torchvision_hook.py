"""The start-up hook that lets PyPI's CUDA torchvision import beside the CPU
torch (feather_vllm/torchvision_hook.py, installed by scripts/setup.sh)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_torchvision_imports_here_without_its_compiled_ops():
    """In the set-up's venv: torchvision imports (the hook declared its two
    import-time ops, since its CUDA build's ops cannot load), its transforms
    run, transformers sees it, and a declared op fails loudly if called."""
    code = """
import torch, torchvision
from feather_vllm import torchvision_hook
from torchvision.transforms.v2 import functional as F
from transformers.utils import is_torchvision_available
print(len(torchvision_hook._LIBRARY), tuple(F.resize(torch.rand(3, 10, 20), [5, 10]).shape), is_torchvision_available())
try:
    torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
except NotImplementedError:
    print("nms refused")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["1 (3, 5, 10) True", "nms refused"]


@pytest.mark.parametrize("compiled", [True, False], ids=["ops-load", "ops-missing"])
def test_declares_the_ops_only_when_the_compiled_ones_cannot_load(tmp_path: Path, compiled: bool):
    from feather_vllm import torchvision_hook

    package = tmp_path / "torchvision"
    package.mkdir()
    if compiled:  # any loadable shared library stands for a _C.so whose ops load
        import ctypes.util

        shutil.copy(Path("/lib/x86_64-linux-gnu") / ctypes.util.find_library("m"), package / "_C.so")
    before = len(torchvision_hook._LIBRARY)
    if compiled:
        assert torchvision_hook.declare_missing_ops(package) is False
        assert len(torchvision_hook._LIBRARY) == before
    else:
        assert torchvision_hook._compiled_ops_load(package) is False
