"""Synthetic localization scenes: one coloured shape on a grey background;
the answer is the cell of a 3x3 grid that holds the shape's centre."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SIZE = 336
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
ROWS = ("top", "middle", "bottom")
CELLS = ("top-left", "top-center", "top-right", "middle-left", "center", "middle-right",
         "bottom-left", "bottom-center", "bottom-right")
MARGIN = 7  # centres keep this far from cell borders, so labels are unambiguous


@dataclasses.dataclass(frozen=True)
class Scene:
    image: Image.Image
    colour: str
    shape: str
    cell: int  # 0..8, row-major
    centre: tuple[int, int]  # (x, y) pixels

    @property
    def question(self) -> str:
        return f"Where is the {self.colour} {self.shape}?"

    @property
    def answer(self) -> str:
        return CELLS[self.cell]

    @property
    def row(self) -> str:
        return ROWS[self.cell // 3]


def make_scene(rng: np.random.Generator, side_range: tuple[int, int] = (64, 112)) -> Scene:
    """One random scene; `side_range` bounds the object's size in pixels."""
    cell_px = SIZE / 3
    cell = int(rng.integers(9))
    row, col = divmod(cell, 3)
    side = int(rng.integers(side_range[0], side_range[1] + 1))
    half = side / 2
    # Centre inside the cell (MARGIN from its borders) with the object inside the image.
    lo_x, hi_x = max(col * cell_px + MARGIN, half), min((col + 1) * cell_px - MARGIN, SIZE - half)
    lo_y, hi_y = max(row * cell_px + MARGIN, half), min((row + 1) * cell_px - MARGIN, SIZE - half)
    cx, cy = int(rng.uniform(lo_x, hi_x)), int(rng.uniform(lo_y, hi_y))
    level = rng.integers(95, 166)
    background = np.clip(level + rng.integers(-10, 11, size=3), 0, 255)
    pixels = np.broadcast_to(background, (SIZE, SIZE, 3)).astype(np.float32)
    image = Image.fromarray(pixels.astype(np.uint8))
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    draw = ImageDraw.Draw(image)
    box = (cx - half, cy - half, cx + half, cy + half)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return Scene(image, colour, shape, cell, (cx, cy))


def held_out(n: int, seed: int = 12345) -> list[Scene]:
    """A fixed evaluation set (a seed the training never uses)."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng) for _ in range(n)]
