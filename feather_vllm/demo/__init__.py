"""The trained demo model: synthetic scenes, training, shipped weights."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
