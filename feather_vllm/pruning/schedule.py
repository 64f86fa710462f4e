"""When a request can be pruned in a given engine step.

The cut needs, in one forward pass, every image token (to rank and drop
them) and the last prompt token (whose query is the criterion). The
scheduler (which reserves KV blocks) and the worker (which prunes) both
decide with this one function on the same numbers, so they always agree
on whether a request runs pruned or falls back to unpruned.
"""

from __future__ import annotations

import dataclasses

from feather_vllm.pruning.selection import grid_side, NonSquareGridError


@dataclasses.dataclass(frozen=True)
class PruneDecision:
    prune: bool
    reason: str | None = None  # why not, when prune is False

    @property
    def fallback(self) -> bool:
        """True when pruning was asked for but this request runs unpruned."""
        return not self.prune and self.reason is not None


def decide(num_computed: int, num_scheduled: int, prompt_len: int,
           image_ranges: list[tuple[int, int]]) -> PruneDecision:
    """Can the step that computes tokens [num_computed, num_computed +
    num_scheduled) of a prompt of `prompt_len` tokens prune its image?

    Call it only for a request whose settings ask for pruning, on the step
    that reaches the end of its prompt (or an earlier prefill step, which
    then returns a fallback: the prompt was split after the image start).
    """
    if not image_ranges:
        return PruneDecision(False)  # text-only: nothing to prune, no fallback
    if len(image_ranges) > 1:
        return PruneDecision(False, "multiple images: pruning supports one image per request")
    offset, length = image_ranges[0]
    try:
        grid_side(length)
    except NonSquareGridError as e:
        return PruneDecision(False, f"non-square image-token layout: {e}")
    if offset + length >= prompt_len:
        return PruneDecision(False, "no text after the image: the last prompt token would be an image token")
    if num_computed > offset:
        return PruneDecision(False, "image tokens were computed in an earlier step (prefix cache or preemption resume)")
    if num_computed + num_scheduled < prompt_len:
        return PruneDecision(False, "prompt split across steps (chunked prefill or token budget)")
    return PruneDecision(True)
