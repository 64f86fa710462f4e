"""When a request can be pruned in a given engine step, and why not.

The cut needs, in one forward pass, every image token (to rank and drop
them) and the last prompt token (whose query is the criterion). The
scheduler decides this once per started prefill, with this function, and
sends the outcome to the worker as a plan (feather_vllm/kv/plan.py); the
worker never decides again.
"""

from __future__ import annotations

import dataclasses
import enum

from feather_vllm.pruning.selection import NonSquareGridError, grid_side


class FallbackReason(str, enum.Enum):
    """Why a request that asked for pruning runs unpruned. A closed set:
    these codes are metric label values and report fields."""

    INVALID_SETTINGS = "invalid_settings"
    MULTIPLE_IMAGES = "multiple_images"
    NON_SQUARE_IMAGE = "non_square_image"
    NO_TEXT_AFTER_IMAGE = "no_text_after_image"
    IMAGE_ALREADY_COMPUTED = "image_already_computed"
    PROMPT_SPLIT = "prompt_split"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    FallbackReason.INVALID_SETTINGS: "the request's pruning settings are invalid for this model",
    FallbackReason.MULTIPLE_IMAGES: "multiple images: pruning supports one image per request",
    FallbackReason.NON_SQUARE_IMAGE: "non-square image-token layout: FEATHER's grid needs side x side tokens",
    FallbackReason.NO_TEXT_AFTER_IMAGE: "no text after the image: the last prompt token would be an image token",
    FallbackReason.IMAGE_ALREADY_COMPUTED:
        "image tokens were computed in an earlier step (prefix cache or a resumed chunked prefill)",
    FallbackReason.PROMPT_SPLIT: "prompt split across steps (chunked prefill or token budget)",
}


@dataclasses.dataclass(frozen=True)
class PruneDecision:
    prune: bool
    reason: FallbackReason | None = None  # why not, when prune is False

    @property
    def fallback(self) -> bool:
        """True when pruning was asked for but this request runs unpruned."""
        return not self.prune and self.reason is not None


def decide(num_computed: int, num_scheduled: int, prompt_len: int,
           image_ranges: list[tuple[int, int]]) -> PruneDecision:
    """Can the step that computes tokens [num_computed, num_computed +
    num_scheduled) of a prompt of `prompt_len` tokens prune its image?

    Call it only for a request whose settings ask for pruning, on the first
    step that reaches its image.
    """
    if not image_ranges:
        return PruneDecision(False)  # text-only: nothing to prune, no fallback
    if len(image_ranges) > 1:
        return PruneDecision(False, FallbackReason.MULTIPLE_IMAGES)
    offset, length = image_ranges[0]
    try:
        grid_side(length)
    except NonSquareGridError:
        return PruneDecision(False, FallbackReason.NON_SQUARE_IMAGE)
    if offset + length >= prompt_len:
        return PruneDecision(False, FallbackReason.NO_TEXT_AFTER_IMAGE)
    if num_computed > offset:
        return PruneDecision(False, FallbackReason.IMAGE_ALREADY_COMPUTED)
    if num_computed + num_scheduled < prompt_len:
        return PruneDecision(False, FallbackReason.PROMPT_SPLIT)
    return PruneDecision(True)
