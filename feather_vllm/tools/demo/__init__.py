"""The trained demo model: synthetic scenes and training. The shipped weights
are package data outside the tools, in feather_vllm/demo/ (no code there)."""

from pathlib import Path

_DATA = Path(__file__).resolve().parents[2] / "demo"
WEIGHTS_DIR = _DATA / "weights"
# The standard weights fine-tuned with serving's own token selection (make demo-train-pruning-aware).
PRUNING_AWARE_WEIGHTS_DIR = _DATA / "weights_pruning_aware"
