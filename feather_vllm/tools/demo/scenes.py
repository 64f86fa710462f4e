"""Synthetic localization scenes: one coloured shape on a grey background;
the answer is the cell of a 3x3 grid that holds the shape's centre.
Two-object scenes (`make_pair`; `held_out_pairs` for multi-turn evaluation)
follow the same rules with two shapes; the standard and pruning-aware
demos are trained on one-object scenes only, the two-object demo (`train
--pairs`) on both, drawn from its training seed, never the held-out one."""

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


def _centre(rng: np.random.Generator, cell: int, half: float) -> tuple[int, int]:
    """A centre inside `cell` (MARGIN from its borders) with an object of
    half-side `half` inside the image."""
    cell_px = SIZE / 3
    row, col = divmod(cell, 3)
    lo_x, hi_x = max(col * cell_px + MARGIN, half), min((col + 1) * cell_px - MARGIN, SIZE - half)
    lo_y, hi_y = max(row * cell_px + MARGIN, half), min((row + 1) * cell_px - MARGIN, SIZE - half)
    return int(rng.uniform(lo_x, hi_x)), int(rng.uniform(lo_y, hi_y))


def _background(rng: np.random.Generator) -> Image.Image:
    level = rng.integers(95, 166)
    background = np.clip(level + rng.integers(-10, 11, size=3), 0, 255)
    return Image.fromarray(np.broadcast_to(background, (SIZE, SIZE, 3)).astype(np.float32).astype(np.uint8))


def _draw(image: Image.Image, colour: str, shape: str, centre: tuple[int, int], half: float) -> None:
    cx, cy = centre
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)((cx - half, cy - half, cx + half, cy + half),
                                                            fill=COLOURS[colour])


def _noisy(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_scene(rng: np.random.Generator, side_range: tuple[int, int] = (64, 112)) -> Scene:
    """One random scene; `side_range` bounds the object's size in pixels."""
    cell = int(rng.integers(9))
    half = int(rng.integers(side_range[0], side_range[1] + 1)) / 2
    centre = _centre(rng, cell, half)
    image = _background(rng)
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    _draw(image, colour, shape, centre, half)
    return Scene(_noisy(rng, image), colour, shape, cell, centre)


def held_out(n: int, seed: int = 12345) -> list[Scene]:
    """A fixed evaluation set (a seed the training never uses)."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class PairScene:
    """Two objects on one background: each a `Scene` of the shared image
    (its question, answer and row are about that object alone)."""

    image: Image.Image
    objects: tuple[Scene, Scene]


GAP = 4  # pixels between the two objects' boxes: neither touches nor hides the other


def make_pair(rng: np.random.Generator, side_range: tuple[int, int] = (64, 112)) -> PairScene:
    """Two objects in two different cells, of different colours and
    different shapes (so "the {colour} {shape}" names one of them by colour
    alone and by shape alone), their boxes at least GAP pixels apart;
    otherwise the single-object scenes' rules (sizes, cell margins,
    background, noise)."""
    cells = [int(c) for c in rng.choice(9, size=2, replace=False)]
    while True:  # redraw sizes and centres until the boxes are apart
        halves = [int(rng.integers(side_range[0], side_range[1] + 1)) / 2 for _ in cells]
        centres = [_centre(rng, cell, half) for cell, half in zip(cells, halves)]
        reach = halves[0] + halves[1] + GAP
        if max(abs(centres[0][0] - centres[1][0]), abs(centres[0][1] - centres[1][1])) >= reach:
            break
    image = _background(rng)
    colours = [str(c) for c in rng.choice(list(COLOURS), size=2, replace=False)]
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    for colour, shape, centre, half in zip(colours, shapes, centres, halves):
        _draw(image, colour, shape, centre, half)
    image = _noisy(rng, image)
    return PairScene(image, tuple(Scene(image, colour, shape, cell, centre)  # type: ignore[arg-type]
                                  for colour, shape, cell, centre in zip(colours, shapes, cells, centres)))


def held_out_pairs(n: int, seed: int = 54321) -> list[PairScene]:
    """A fixed two-object evaluation set (a seed the training never uses)."""
    rng = np.random.default_rng(seed)
    return [make_pair(rng) for _ in range(n)]
