"""Let the CUDA build of torchvision import beside the CPU build of torch.

PyPI's x86-64 torchvision wheels are CUDA builds: their compiled ops
(`torchvision/_C.so`) link CUDA's torch libraries, which a CPU torch does not
have, so the library fails to load and `import torchvision` then dies on
`register_fake("torchvision::nms")` ("operator torchvision::nms does not
exist"). torchvision's Python half (its transforms, which transformers'
image and video processors use) needs none of those ops. LLaVA-OneVision's
processor cannot be built without torchvision, so the CPU set-up
(scripts/setup.sh) installs the wheel and a `.pth` line that imports this
module at interpreter start-up; the finder below then runs once, at the first
`import torchvision`, and declares the two ops' schemas (without kernels:
calling them fails loudly) only when `_C.so` cannot load. Where torchvision's
ops load (any GPU install, the official vLLM image) it does nothing.

Kept free of heavy imports: it runs in every interpreter of the venv.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

# The ops whose fake kernels torchvision registers unconditionally at import
# (torchvision/_meta_registrations.py); every other registration there is
# skipped when the compiled ops are missing.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = []  # keeps the torch.library.Library alive (it unregisters on collection)


def _compiled_ops_load(package_dir: Path) -> bool:
    candidates = list(package_dir.glob("_C*.so"))
    if not candidates:
        return False
    try:
        ctypes.CDLL(str(candidates[0]))
    except OSError:
        return False
    return True


def declare_missing_ops(package_dir: Path) -> bool:
    """Declare torchvision's import-time op schemas unless its compiled ops
    load; True when it declared them."""
    if _compiled_ops_load(package_dir):
        return False
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _LIBRARY.append(library)
    return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs `declare_missing_ops` just before torchvision first executes."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.submodule_search_locations:
            declare_missing_ops(Path(next(iter(spec.submodule_search_locations))))
        return spec


def install() -> None:
    """Put the finder first on `sys.meta_path` (once)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


install()
