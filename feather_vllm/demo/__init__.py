"""The trained demo model: synthetic scenes, training, shipped weights."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
# The same recipe trained with --pruning-aware (random tokens dropped on the presets' schedules).
PRUNING_AWARE_WEIGHTS_DIR = Path(__file__).parent / "weights_pruning_aware"
