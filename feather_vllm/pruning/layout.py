"""Image-token layouts that are not one square raster, and FEATHER on them.

LLaVA-1.5 gives each image one side x side raster (pruning/selection.py).
LLaVA-NeXT (v1.6) and LLaVA-OneVision give each image, in this order:

1. the **base view**: the whole image resized to one vision tile, a
   side x side raster (24 x 24 for CLIP-336/14, 27 x 27 for SigLIP-384/14),
   with no newline token;
2. the **tile map**: the high-resolution tiles stitched into one feature
   map, cropped to the image's real (unpadded) aspect, for OneVision
   bilinearly interpolated down to about 9 tiles' worth of tokens when the
   crop holds more than 1.1^2 x 9 tiles' worth, emitted row by row with one
   image-newline token after every row.

`ImageLayout` describes that as regions (2-D rasters at known offsets of
the image's token run, with or without a newline token after each row).
Its constructors compute exactly what vLLM 0.32 produces for an image size
(`LlavaNextForConditionalGeneration._merge_image_patch_embeddings` and the
processor's `get_num_image_tokens`; transformers' `pack_image_features`
agrees). `select_stage_layout` is FEATHER's stage on such a layout, and the
report helpers give kept counts and kept maps per region.

The rules (docs/llava_family_layouts.md):
- ranking: one top-k over all the image's raster tokens of every region
  together; newline tokens are never ranked;
- grid: FEATHER's uniform grid (every `grid_stride`-th row and column) is
  laid on each region's own raster, starting at its top-left token;
- newlines: always kept (every stage), and counted apart from the top-k and
  the grid: they carry the row structure the decoder was trained on.

Pure python/torch: no vLLM or transformers import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from feather_vllm.pruning.config import PruningConfig, Stage
from feather_vllm.pruning.selection import stage_keep_count

# Model defaults (transformers' LlavaNextConfig / LlavaOnevisionConfig).
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
LLAVA_ONEVISION_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
# vLLM 0.32 hard-codes "anyres_max_9" for OneVision images (the count in
# LlavaOnevisionProcessingInfo and the merge both), whatever the config says.
ONEVISION_MAX_TILES = 9

NEWLINE = "newline"  # the key of newline tokens in per-region reports


@dataclasses.dataclass(frozen=True)
class Region:
    """One 2-D raster of image tokens inside an image's token run.

    Token (row, col) sits at `offset + row * (cols + newline) + col`; when
    `newline` is set, one newline token follows each row, at
    `offset + row * (cols + 1) + cols`. `rows` or `cols` may be 0 (an image
    so thin that its crop of the tile map is empty): with `newline` and
    cols == 0 the region is `rows` newline tokens and no image token, which
    is what vLLM emits then.
    """

    name: str
    offset: int
    rows: int
    cols: int
    newline: bool = False

    def __post_init__(self) -> None:
        for field in ("offset", "rows", "cols"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"region {self.name!r}: {field} must be a non-negative integer, got {value!r}")

    @property
    def row_stride(self) -> int:
        return self.cols + int(self.newline)

    @property
    def num_image_tokens(self) -> int:
        """Raster tokens (what the criterion ranks)."""
        return self.rows * self.cols

    @property
    def num_newlines(self) -> int:
        return self.rows if self.newline else 0

    @property
    def span(self) -> int:
        """Tokens of the run this region occupies, newlines included."""
        return self.rows * self.row_stride

    @property
    def end(self) -> int:
        return self.offset + self.span

    def indices(self) -> torch.Tensor:
        """[rows, cols] run index of each raster token."""
        rows = torch.arange(self.rows).unsqueeze(1) * self.row_stride
        return self.offset + rows + torch.arange(self.cols).unsqueeze(0)

    def newline_indices(self) -> torch.Tensor:
        """Run index of the newline ending each row (empty without newlines)."""
        if not self.newline:
            return torch.zeros(0, dtype=torch.long)
        return self.offset + torch.arange(self.rows) * self.row_stride + self.cols

    def grid(self, stride: int) -> torch.Tensor:
        """Run indices of this region's uniform grid: every `stride`-th row
        and column of its own raster from (0, 0), raster order."""
        return self.indices()[::stride, ::stride].flatten()


@dataclasses.dataclass(frozen=True)
class AnyresInfo:
    """How a NeXT/OneVision tile map was derived (for reports and tests).

    `grid`: tiles (down, across) of the best-fit resolution; `full`: the
    stitched map in tokens; `crop_offset`/`unpadded`: the crop to the
    image's aspect (top-left, size); `interpolated`: the size OneVision
    resized the crop to, None when it did not."""

    best_resolution: tuple[int, int]
    grid: tuple[int, int]
    full: tuple[int, int]
    crop_offset: tuple[int, int]
    unpadded: tuple[int, int]
    interpolated: tuple[int, int] | None = None


class LayoutStageBound(NamedTuple):
    """Kept tokens of one stage: raster tokens between `image_lo` and
    `image_hi`, plus `newlines` newline tokens (always kept)."""

    image_lo: int
    image_hi: int
    newlines: int

    @property
    def lo(self) -> int:
        return self.image_lo + self.newlines

    @property
    def hi(self) -> int:
        return self.image_hi + self.newlines


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """One image's tokens: regions in run order, back to back from 0."""

    regions: tuple[Region, ...]
    model: str = "custom"
    anyres: AnyresInfo | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.regions:
            raise ValueError("an image layout needs at least one region")
        position = 0
        names = set()
        for region in self.regions:
            if region.offset != position:
                raise ValueError(
                    f"region {region.name!r} starts at {region.offset}, expected {position}: "
                    "regions must follow each other without gaps")
            if region.name in names or region.name == NEWLINE:
                raise ValueError(f"region name {region.name!r} is repeated or reserved")
            names.add(region.name)
            position = region.end

    # -- constructors -----------------------------------------------------------

    @classmethod
    def from_rasters(cls, *specs: tuple[str, int, int, bool], model: str = "custom") -> "ImageLayout":
        """Regions back to back from (name, rows, cols, newline) specs."""
        regions, offset = [], 0
        for name, rows, cols, newline in specs:
            region = Region(name, offset, rows, cols, newline)
            regions.append(region)
            offset = region.end
        return cls(tuple(regions), model)

    @classmethod
    def square(cls, side: int) -> "ImageLayout":
        """LLaVA-1.5 (and the paper's Prismatic): one side x side raster."""
        if side < 1:
            raise ValueError(f"side must be >= 1, got {side}")
        return cls((Region("image", 0, side, side),), "square")

    @classmethod
    def llava_next(cls, image_size: tuple[int, int], *,
                   grid_pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS,
                   vision_image_size: int = 336, patch_size: int = 14) -> "ImageLayout":
        """LLaVA-NeXT (v1.6), `spatial_unpad`: base view, then the unpadded
        tile map with a newline after each row. `image_size` is the original
        image's (height, width), as vLLM's `image_sizes`."""
        return cls._anyres("llava_next", image_size, grid_pinpoints, vision_image_size, patch_size, None)

    @classmethod
    def llava_onevision(cls, image_size: tuple[int, int], *,
                        grid_pinpoints: Sequence[Sequence[int]] = LLAVA_ONEVISION_PINPOINTS,
                        vision_image_size: int = 384, patch_size: int = 14,
                        max_tiles: int = ONEVISION_MAX_TILES) -> "ImageLayout":
        """LLaVA-OneVision (anyres_max_9): as NeXT, but when the crop holds
        rows x cols tokens with ratio = sqrt(rows * cols / (max_tiles *
        side^2)) > 1.1, it is bilinearly interpolated to
        (int(rows // ratio), int(cols // ratio)) first."""
        return cls._anyres("llava_onevision", image_size, grid_pinpoints, vision_image_size, patch_size,
                           max_tiles)

    @classmethod
    def for_hf_config(cls, hf_config: object, image_size: tuple[int, int]) -> "ImageLayout":
        """The layout vLLM gives an image of `image_size` (height, width)
        under a transformers config (see `LayoutRule.of`)."""
        layout = LayoutRule.of(hf_config).layout(image_size)
        if layout is None:
            raise ValueError(f"no layout for an image of {image_size!r} under {hf_config!r}")
        return layout

    @classmethod
    def _anyres(cls, model: str, image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]],
                vision_image_size: int, patch_size: int, max_tiles: int | None) -> "ImageLayout":
        height, width = (int(v) for v in image_size)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {image_size!r}")
        side = vision_image_size // patch_size
        best = select_best_resolution((height, width), grid_pinpoints)
        grid = (best[0] // vision_image_size, best[1] // vision_image_size)
        full = (grid[0] * side, grid[1] * side)
        offset, unpadded = unpad_crop((height, width), full)
        rows, cols = unpadded
        shrunk = _interpolated(rows, cols, side, max_tiles)
        interpolated = None if shrunk == (rows, cols) else shrunk
        rows, cols = shrunk
        info = AnyresInfo(best, grid, full, offset, unpadded, interpolated)
        layout = cls.from_rasters(("base", side, side, False), ("tiles", rows, cols, True), model=model)
        return dataclasses.replace(layout, anyres=info)

    # -- structure --------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens of the image's run (vLLM's placeholder count)."""
        return self.regions[-1].end

    @property
    def num_image_tokens(self) -> int:
        """Raster tokens of all regions (what the criterion ranks)."""
        return sum(r.num_image_tokens for r in self.regions)

    @property
    def num_newlines(self) -> int:
        return sum(r.num_newlines for r in self.regions)

    @property
    def is_square(self) -> bool:
        """One square raster without newlines: LLaVA-1.5's case."""
        (region, *rest) = self.regions
        return not rest and not region.newline and region.rows == region.cols

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def newline_indices(self) -> torch.Tensor:
        """Run indices of every newline token, ascending."""
        parts = [r.newline_indices() for r in self.regions]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def newline_rows(self) -> list[tuple[int, str, int]]:
        """(run index, region name, raster row it ends) of every newline."""
        return [(int(i), r.name, row) for r in self.regions for row, i in enumerate(r.newline_indices().tolist())]

    def newline_mask(self) -> torch.Tensor:
        """[num_tokens] bool, True at newline tokens."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        mask[self.newline_indices()] = True
        return mask

    def locate(self, index: int) -> tuple[str, int, int | None]:
        """(region name, row, col) of a run index; col is None for a newline."""
        if not 0 <= index < self.num_tokens:
            raise IndexError(f"token {index} is outside the image's {self.num_tokens} tokens")
        for region in self.regions:
            if index < region.end:
                row, col = divmod(index - region.offset, region.row_stride)
                return region.name, row, (None if col == region.cols else col)
        raise AssertionError("unreachable: regions cover the run")

    def grid(self, stride: int) -> torch.Tensor:
        """FEATHER's uniform grid laid on every region's own raster, ascending."""
        if stride < 1:
            raise ValueError(f"grid stride must be >= 1, got {stride}")
        return torch.cat([r.grid(stride) for r in self.regions]).sort().values

    def grid_size(self, stride: int) -> int:
        return sum(math.ceil(r.rows / stride) * math.ceil(r.cols / stride) for r in self.regions)


@dataclasses.dataclass(frozen=True)
class LayoutRule:
    """How a model lays out one image's tokens: what `ImageLayout` needs of
    the model's config, hashable (it rides on vLLM's KV-cache specs to the
    scheduler, which decides each image's layout once, from its size)."""

    model_type: str  # "llava" (LLaVA-1.5), "llava_next" or "llava_onevision"
    vision_image_size: int
    patch_size: int
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, hf_config: object) -> "LayoutRule":
        """The rule of a transformers config (duck-typed: `model_type`,
        `vision_config.image_size/patch_size`, `image_grid_pinpoints`)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in ("llava", "llava_next", "llava_onevision"):
            raise ValueError(f"no image-token layout for model_type {model_type!r}")
        vision = hf_config.vision_config  # type: ignore[attr-defined]
        pinpoints = () if model_type == "llava" else tuple(
            (int(h), int(w)) for h, w in hf_config.image_grid_pinpoints)  # type: ignore[attr-defined]
        return cls(model_type, int(vision.image_size), int(vision.patch_size), pinpoints)

    @property
    def needs_image_size(self) -> bool:
        """Anyres models: the layout depends on the image's size."""
        return self.model_type != "llava"

    def layout(self, image_size: tuple[int, int] | None, num_tokens: int | None = None) -> "ImageLayout | None":
        """The layout of an image of `image_size` (height, width; unused for
        LLaVA-1.5), or None when it cannot be known: an anyres image
        without a size, or a layout that does not have the `num_tokens`
        the engine placed for it (never guess a layout)."""
        if not self.needs_image_size:
            layout = ImageLayout.square(self.vision_image_size // self.patch_size)
        elif image_size is None:
            return None
        else:
            build = ImageLayout.llava_next if self.model_type == "llava_next" else ImageLayout.llava_onevision
            layout = build(tuple(int(v) for v in image_size), grid_pinpoints=self.grid_pinpoints,
                           vision_image_size=self.vision_image_size, patch_size=self.patch_size)
        return layout if num_tokens is None or layout.num_tokens == num_tokens else None

    def most_tokens(self) -> int:
        """The most tokens one image can take: LLaVA-1.5's one raster; for
        NeXT, an image the size of a tile grid (its map is then not
        cropped), the largest; for OneVision, a bound: the largest map any
        crop of any grid gives after interpolation (8,829 on OneVision's
        defaults; a scan of image sizes in 23-pixel steps finds 8,765)."""
        if not self.needs_image_size:
            return self.layout(None).num_tokens
        side = self.vision_image_size // self.patch_size
        max_tiles = ONEVISION_MAX_TILES if self.model_type == "llava_onevision" else None
        most = 0
        for height, width in self.grid_pinpoints:
            full_rows, full_cols = height // self.vision_image_size * side, width // self.vision_image_size * side
            # unpad_crop trims one axis: every crop of either axis, the full map included.
            crops = [(r, full_cols) for r in range(1, full_rows + 1)] + [(full_rows, c) for c in range(1, full_cols)]
            for rows, cols in crops:
                rows, cols = _interpolated(rows, cols, side, max_tiles)
                most = max(most, side * side + rows * cols + rows)
        return most


def _interpolated(rows: int, cols: int, side: int, max_tiles: int | None) -> tuple[int, int]:
    """OneVision's anyres_max_N: a crop above 1.1x N tiles' worth of tokens
    (ratio = sqrt(rows * cols / (N * side^2)) > 1.1) is bilinearly
    interpolated to (int(rows // ratio), int(cols // ratio)); NeXT (None)
    keeps the crop."""
    if max_tiles is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_tiles * side**2))
    return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)


# -- the anyres arithmetic (transformers' / vLLM's, reimplemented) --------------

def select_best_resolution(original_size: tuple[int, int],
                           possible_resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """transformers' `image_processing_utils.select_best_resolution`: the
    (height, width) pinpoint that keeps the most of the image's resolution,
    then wastes the least; the first such pinpoint wins ties."""
    original_height, original_width = original_size
    best_fit = None
    max_effective, min_wasted = 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled = int(original_width * scale) * int(original_height * scale)
        effective = min(downscaled, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best_fit = (int(height), int(width))
    if best_fit is None:
        raise ValueError(f"no grid pinpoint fits an image of {original_size}")
    return best_fit


def unpad_crop(original_size: tuple[int, int], current_size: tuple[int, int]
               ) -> tuple[tuple[int, int], tuple[int, int]]:
    """transformers' `unpad_image` as arithmetic: ((top, left), (rows, cols))
    of the crop of a `current_size` token map to the original aspect. The
    padding is removed symmetrically, `(current - new) // 2` each side, so
    an odd difference keeps one more row/column than `new`."""
    original_height, original_width = original_size
    current_height, current_width = current_size
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return (padding, 0), (current_height - 2 * padding, current_width)
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return (0, padding), (current_height, current_width - 2 * padding)


# -- selection ------------------------------------------------------------------

def select_stage_layout(scores: torch.Tensor, present: torch.Tensor, stage: Stage,
                        layout: ImageLayout) -> torch.Tensor:
    """New survivors (run indices within the image, ascending) of one stage.

    `present[i]` (a run index) is scored by `scores[i]`; the scores of
    newline tokens are ignored (best: computed with the softmax over the
    raster tokens only). Kept: the top `int(n * keep)` (at least 1) of the
    n present raster tokens of all regions together (ties rank the earlier
    entry of `present` first), united with the present tokens of each
    region's own uniform grid when the stage has one, united with every
    present newline token. On `ImageLayout.square(side)` this is exactly
    `select_stage(scores, present, stage, side * side)`.
    """
    if scores.numel() != present.numel():
        raise ValueError(f"{scores.numel()} scores for {present.numel()} present image tokens")
    present = present.long().cpu()
    if present.numel() and (int(present.min()) < 0 or int(present.max()) >= layout.num_tokens):
        raise ValueError(f"present tokens must lie in [0, {layout.num_tokens})")
    newline = layout.newline_mask()[present]
    candidates = present[~newline]
    k = stage_keep_count(candidates.numel(), stage)
    order = torch.sort(scores.float().cpu()[~newline], descending=True, stable=True).indices
    kept = [candidates[order[:k]], present[newline]]
    if stage.grid_stride:
        grid = layout.grid(stage.grid_stride)
        kept.append(grid[torch.isin(grid, present)])
    return torch.unique(torch.cat(kept))  # sorted ascending


def layout_kept_per_stage_bounds(config: PruningConfig, layout: ImageLayout,
                                 also: Sequence[int] = ()) -> list[LayoutStageBound]:
    """Kept tokens after each stage: raster tokens (min, max) and newlines.

    The raster bounds follow cost.kept_per_stage_bounds with the layout's
    raster tokens and its per-region grid size; the newlines are all kept
    at every stage, so a stage holds at most top-k + grid + newlines. On a
    square layout (no newlines) the totals equal kept_per_stage_bounds.
    `also[s]`: tokens stage s keeps on top of its own selection (an earlier
    turn's, follow_up "keep_both"), which also enter the next stage."""
    lo = hi = layout.num_image_tokens
    out = []
    for s, stage in enumerate(config.stages):
        k_lo, k_hi = stage_keep_count(lo, stage), stage_keep_count(hi, stage)
        if stage.grid_stride:
            grid = layout.grid_size(stage.grid_stride)
            lo, hi = k_lo, min(hi, k_hi + min(grid, hi))
        else:
            lo, hi = k_lo, k_hi
        hi += also[s] if s < len(also) else 0
        # An image with fewer raster tokens than the top-k floor of 1 keeps them all.
        lo, hi = min(lo, layout.num_image_tokens), min(hi, layout.num_image_tokens)
        out.append(LayoutStageBound(lo, hi, layout.num_newlines))
    return out


def layout_kept_per_stage_max(config: PruningConfig, layout: ImageLayout, also: Sequence[int] = ()) -> list[int]:
    """Most tokens (raster + newlines) each stage can keep: a KV reservation
    (`also` as in `layout_kept_per_stage_bounds`)."""
    return [b.hi for b in layout_kept_per_stage_bounds(config, layout, also)]


# -- per-region reports ---------------------------------------------------------

def _kept_tensor(kept: Sequence[int] | torch.Tensor, layout: ImageLayout) -> torch.Tensor:
    kept = torch.as_tensor(kept, dtype=torch.long).flatten()
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= layout.num_tokens):
        raise ValueError(f"kept tokens must lie in [0, {layout.num_tokens})")
    return kept


def region_kept_maps(kept: Sequence[int] | torch.Tensor, layout: ImageLayout) -> dict[str, torch.Tensor]:
    """Each region's [rows, cols] bool map of kept raster tokens."""
    mask = torch.zeros(layout.num_tokens, dtype=torch.bool)
    mask[_kept_tensor(kept, layout)] = True
    return {r.name: mask[r.indices()] for r in layout.regions}


def region_kept_indices(kept: Sequence[int] | torch.Tensor, layout: ImageLayout) -> dict[str, list[int]]:
    """Kept raster tokens per region as `row * cols + col` in the region's
    own raster (a square region's index is the image's)."""
    return {name: m.flatten().nonzero().flatten().tolist() for name, m in region_kept_maps(kept, layout).items()}


def region_kept_counts(kept: Sequence[int] | torch.Tensor, layout: ImageLayout) -> dict[str, int]:
    """Kept tokens per region, and kept newline tokens under "newline"."""
    kept = _kept_tensor(kept, layout)
    counts = {name: int(m.sum()) for name, m in region_kept_maps(kept, layout).items()}
    counts[NEWLINE] = int(torch.isin(layout.newline_indices(), kept).sum())
    return counts


QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def region_stats(kept: Sequence[int] | torch.Tensor, layout: ImageLayout) -> dict[str, dict[str, float]]:
    """Per region: kept and total raster tokens, mean kept row (0 = top row,
    1 = bottom row, NaN when none is kept) and the kept fraction of each
    quadrant (`QUADRANTS`; rows < rows/2 are top, cols < cols/2 left).
    FastV's RoPE-biased criterion pushes the mean row towards 1 (bottom rows
    sit next to the text in raster order); uniform coverage gives 0.5."""
    out: dict[str, dict[str, float]] = {}
    maps = region_kept_maps(kept, layout)
    for region in layout.regions:
        kept_map = maps[region.name]
        rows, cols = region.rows, region.cols
        entry: dict[str, float] = {"kept": int(kept_map.sum()), "tokens": rows * cols}
        kept_rows = kept_map.nonzero()[:, 0].double()
        if kept_rows.numel() == 0:
            entry["mean_row"] = float("nan")
        else:
            entry["mean_row"] = float((kept_rows / max(rows - 1, 1)).mean()) if rows > 1 else 0.0
        top = torch.arange(rows).unsqueeze(1) < rows / 2
        left = torch.arange(cols).unsqueeze(0) < cols / 2
        for name, rsel, csel in zip(QUADRANTS, (top, top, ~top, ~top), (left, ~left, left, ~left)):
            cell = rsel & csel
            total = int(cell.sum())
            entry[name] = int((kept_map & cell).sum()) / total if total else float("nan")
        out[region.name] = entry
    return out
