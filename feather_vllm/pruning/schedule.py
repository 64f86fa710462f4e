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
from collections.abc import Sequence

from feather_vllm.pruning.layout import ImageLayout


class FallbackReason(str, enum.Enum):
    """Why a request that asked for pruning runs unpruned. A closed set:
    these codes are metric label values and report fields."""

    INVALID_SETTINGS = "invalid_settings"
    UNKNOWN_LAYOUT = "unknown_image_layout"
    NO_TEXT_AFTER_IMAGE = "no_text_after_image"
    IMAGE_ALREADY_COMPUTED = "image_already_computed"
    PROMPT_SPLIT = "prompt_split"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    FallbackReason.INVALID_SETTINGS: "the request's pruning settings are invalid for this model",
    FallbackReason.UNKNOWN_LAYOUT:
        "the image's token layout is unknown (an anyres image without its size) or is not the model's "
        "(FEATHER's grid needs each region's raster)",
    FallbackReason.NO_TEXT_AFTER_IMAGE:
        "no text after the last image: the last prompt token would be an image token",
    FallbackReason.IMAGE_ALREADY_COMPUTED:
        "image tokens were computed in an earlier step (prefix cache or a resumed chunked prefill)",
    FallbackReason.PROMPT_SPLIT:
        "the images and the rest of the prompt exceed one step's token budget (chunked prefill)",
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
           image_ranges: list[tuple[int, int]], layouts: Sequence[ImageLayout | None]) -> PruneDecision:
    """Can the step that computes tokens [num_computed, num_computed +
    num_scheduled) of a prompt of `prompt_len` tokens prune its images
    (`image_ranges`: (offset, length) of each, in prompt order; `layouts`:
    each one's token layout, None where it is not known)?

    Call it only for a request whose settings ask for pruning, on the first
    step that reaches its first image.
    """
    if not image_ranges:
        return PruneDecision(False)  # text-only: nothing to prune, no fallback
    if any(layout is None for layout in layouts):
        return PruneDecision(False, FallbackReason.UNKNOWN_LAYOUT)
    first = image_ranges[0][0]
    last_end = max(offset + length for offset, length in image_ranges)
    if last_end >= prompt_len:
        return PruneDecision(False, FallbackReason.NO_TEXT_AFTER_IMAGE)
    if num_computed > first:
        return PruneDecision(False, FallbackReason.IMAGE_ALREADY_COMPUTED)
    if num_computed + num_scheduled < prompt_len:
        return PruneDecision(False, FallbackReason.PROMPT_SPLIT)
    return PruneDecision(True)


def chunk_end(num_computed: int, num_scheduled: int, prompt_len: int, first_image: int,
              max_chunk: int) -> int:
    """Tokens to schedule for a prefill that asks for pruning, given that
    the scheduler offers `num_scheduled` from `num_computed` on.

    The cut needs its first image's first token and the last prompt token in
    one step: a chunk that would end between them ends before the image
    instead (possibly 0 tokens: the request waits for a step with room).
    When the images and the rest of the prompt exceed `max_chunk` (the most
    any step can give one request) no step can hold them: the offer stands,
    and the request runs unpruned (`PROMPT_SPLIT`).
    """
    end = num_computed + num_scheduled
    if num_computed > first_image or end <= first_image or end >= prompt_len:
        return num_scheduled
    if prompt_len - first_image > max_chunk:
        return num_scheduled
    return first_image - num_computed
