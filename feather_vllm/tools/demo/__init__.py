"""The trained demo model: synthetic scenes and training. The shipped weights
are package data outside the tools, in feather_vllm/demo/ (no code there)."""

from pathlib import Path

_DATA = Path(__file__).resolve().parents[2] / "demo"
WEIGHTS_DIR = _DATA / "weights"
# The same recipe trained with --pruning-aware (random tokens dropped on the presets' schedules).
PRUNING_AWARE_WEIGHTS_DIR = _DATA / "weights_pruning_aware"
