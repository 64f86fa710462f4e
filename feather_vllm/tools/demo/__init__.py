"""The trained demo model: synthetic scenes and training. The shipped weights
are package data outside the tools, in feather_vllm/demo/ (no code there)."""

from pathlib import Path

_DATA = Path(__file__).resolve().parents[2] / "demo"
WEIGHTS_DIR = _DATA / "weights"
# The standard weights fine-tuned with serving's own token selection (make demo-train-pruning-aware).
PRUNING_AWARE_WEIGHTS_DIR = _DATA / "weights_pruning_aware"
# Trained from scratch on one- and two-object scenes to answer about the
# object asked for (make demo-train-two-object): what `evaluate --multi-turn` needs.
TWO_OBJECT_WEIGHTS_DIR = _DATA / "weights_two_object"
