"""The facts of one request's pruning, each decided once and carried typed.

- `PrunePlan`: the scheduler's decision to prune (settings, the images'
  placeholder ranges, the most image tokens each stage may keep). It sizes
  the KV reservation and travels to the worker with the step that cuts.
- `KeptTokens`: what the worker's cutting prefill kept, per stage and
  image. It returns to the scheduler in the step's runner output.
- `PruningReport`: what the finished request got (plan or fallback, kept
  tokens, KV blocks each group really held, the earlier turn it reused or
  whose kept set its cut kept too), attached to its output.

No vLLM import here: the gateway and tools read reports without vLLM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from feather_vllm.pruning.config import PruningConfig, resolve
from feather_vllm.pruning.layout import ImageLayout
from feather_vllm.pruning.schedule import FallbackReason

REPORT_KEY = "feather"  # the report's key in RequestOutput.kv_transfer_params


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """One image's placeholder tokens in the prompt (from the engine's
    multimodal features) and how they are laid out (its regions, decided
    once by the scheduler from the model's `LayoutRule` and the image's size)."""

    offset: int  # position of its first token
    length: int
    layout: ImageLayout


def in_effect(cut_layers: Sequence[int], layer: int) -> int | None:
    """Index of the cut whose effect `layer` sees (the last cut at or before
    it; cuts ascending), None before the first: the one definition of
    "which tokens are absent from layer L" for plans, kept tokens and the
    cutting forward."""
    found = None
    for i, cut in enumerate(cut_layers):
        if cut <= layer:
            found = i
    return found


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """A request the scheduler decided to prune in the step that cuts.

    Every image is pruned on its own: at each stage it keeps its own top
    fraction (and FEATHER grid) of its own surviving tokens, scored by the
    last prompt token's attention to that image's keys."""

    config: PruningConfig
    images: tuple[ImageSpan, ...]  # in prompt order
    kept_max: tuple[int, ...]  # per stage: the most image tokens (all images) it can keep
    life: int = 0  # the request's preemptions when decided: what its cut keeps answers this plan only
    # An earlier turn's kept set, whose pruned KV this request found in the
    # prefix cache: no cut, every token it computes lies after its images.
    reuse: "KeptTokens | None" = None
    # An earlier turn's kept set that this cut keeps as well, at each stage
    # (follow_up "keep_both"): the stage keeps its own selection and these.
    unite: "KeptTokens | None" = None
    # With `reuse`, follow_up "add_back": per image, how many of the image
    # tokens `reuse` dropped at the first cut this step adds back (the
    # prompt's own criterion picks them); from the first cut on they sit
    # after the `insert_at` prompt tokens taken from the cache.
    add: tuple[int, ...] = ()
    insert_at: int = 0

    @property
    def adds_back(self) -> bool:
        return any(self.add)

    @property
    def first_offset(self) -> int:
        """Where the first image starts: nothing before it is ever compacted."""
        return self.images[0].offset

    @property
    def image_tokens(self) -> int:
        return sum(image.length for image in self.images)

    def dropped_at(self, layer: int) -> int:
        """Image tokens surely absent from `layer` (what its KV need not hold)."""
        i = in_effect([stage.layer for stage in self.config.stages], layer)
        return 0 if i is None else self.image_tokens - self.kept_max[i]


@dataclasses.dataclass(frozen=True)
class StageKept:
    """The image tokens one cut kept: per image, 0-based indices within
    that image, ascending."""

    layer: int  # the cut: the first decoder layer without the dropped tokens
    per_image: tuple[tuple[int, ...], ...]

    @property
    def total(self) -> int:
        return sum(len(kept) for kept in self.per_image)


@dataclasses.dataclass(frozen=True)
class KeptTokens:
    """What a request's cutting prefill kept, per stage."""

    stages: tuple[StageKept, ...]
    life: int = 0  # the plan's (PrunePlan.life) that this cut answers

    def dropped_at(self, layer: int, image_tokens: int) -> int:
        """Image tokens (of `image_tokens` in all) absent from `layer`."""
        i = in_effect([stage.layer for stage in self.stages], layer)
        return 0 if i is None else image_tokens - self.stages[i].total

    def dropped_positions(self, layer: int, images: Sequence[ImageSpan]) -> tuple[int, ...]:
        """Prompt positions of the image tokens absent from `layer`, ascending."""
        i = in_effect([stage.layer for stage in self.stages], layer)
        if i is None:
            return ()
        out: list[int] = []
        for image, kept in zip(images, self.stages[i].per_image):
            kept_set = set(kept)
            out.extend(image.offset + t for t in range(image.length) if t not in kept_set)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class Reused:
    """A request that found an earlier turn's pruned KV in the prefix cache."""

    tokens: int  # prompt tokens it took from the cache, its images included
    kept_from: str  # the request whose cut decided the kept set
    added: int = 0  # image tokens that kept set lacked, added back for this prompt (follow_up "add_back")


@dataclasses.dataclass(frozen=True)
class United:
    """A follow-up turn whose cut kept an earlier turn's kept set as well."""

    kept_from: str  # the request whose kept set it kept


@dataclasses.dataclass(frozen=True)
class PruningReport:
    """What pruning did to one finished request, as the engine saw it."""

    preset: str
    image_tokens: tuple[int, ...]  # per image, from the engine's multimodal placeholders
    stages: tuple[StageKept, ...] = ()
    fallback: FallbackReason | None = None
    kv_blocks_held: tuple[int, ...] = ()  # per KV-cache group, at finish
    kv_blocks_unpruned: tuple[int, ...] = ()  # per group, the same tokens unpruned
    reused: Reused | None = None
    layouts: tuple[ImageLayout, ...] = ()  # per image, how its tokens are laid out (when it was pruned)
    united: United | None = None

    @property
    def image_tokens_total(self) -> int:
        return sum(self.image_tokens)

    @property
    def kv_blocks_used(self) -> int:
        return sum(self.kv_blocks_held)

    @property
    def kv_blocks_unpruned_total(self) -> int:
        return sum(self.kv_blocks_unpruned)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the engine's output serializer takes no classes)."""
        return {"preset": self.preset, "image_tokens": list(self.image_tokens),
                "stages": [{"layer": s.layer, "kept": [list(k) for k in s.per_image]} for s in self.stages],
                "fallback": self.fallback.value if self.fallback else None,
                "kv_blocks_held": list(self.kv_blocks_held),
                "kv_blocks_unpruned": list(self.kv_blocks_unpruned),
                "reused": dataclasses.asdict(self.reused) if self.reused else None,
                "united": dataclasses.asdict(self.united) if self.united else None,
                "layouts": [{"model": layout.model,
                             "regions": [[r.name, r.rows, r.cols, r.newline] for r in layout.regions]}
                            for layout in self.layouts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruningReport":
        return cls(preset=data["preset"], image_tokens=tuple(data["image_tokens"]),
                   stages=tuple(StageKept(int(s["layer"]), tuple(tuple(k) for k in s["kept"]))
                                for s in data["stages"]),
                   fallback=FallbackReason(data["fallback"]) if data["fallback"] else None,
                   kv_blocks_held=tuple(data["kv_blocks_held"]),
                   kv_blocks_unpruned=tuple(data["kv_blocks_unpruned"]),
                   reused=Reused(**data["reused"]) if data.get("reused") else None,
                   united=United(**data["united"]) if data.get("united") else None,
                   layouts=tuple(ImageLayout.from_rasters(*(tuple(r) for r in layout["regions"]),
                                                          model=layout["model"])
                                 for layout in data.get("layouts", ())))


def report_of(output: Any) -> PruningReport | None:
    """The pruning report of a finished `vllm.RequestOutput` (None for a
    request that has not finished or ran on another model)."""
    params = getattr(output, "kv_transfer_params", None) or {}
    data = params.get(REPORT_KEY)
    return PruningReport.from_dict(data) if data else None


def requested_config(extra_args: Mapping[str, Any] | None, default: str | None,
                     num_layers: int) -> PruningConfig | FallbackReason:
    """A request's settings (`extra_args["feather"]`, else the engine's
    default), validated for a decoder of `num_layers`; the fallback reason
    when they are invalid."""
    from feather_vllm.pruning.config import PruningConfigError

    value = (extra_args or {}).get(REPORT_KEY)
    try:
        return resolve(value if value is not None else default).validate(num_layers)
    except PruningConfigError:
        return FallbackReason.INVALID_SETTINGS


@dataclasses.dataclass
class WorkerPruning:
    """Worker-side pruning of one request: the plan it was sent, and what
    its cutting prefill kept (None until that step has run). Lives on the
    model runner's cached request state, so it goes when the request goes."""

    plan: PrunePlan
    kept: KeptTokens | None = None

    def dropped_at(self, layer: int) -> int:
        """Image tokens absent from `layer`'s KV (0 before the cut has run)."""
        return self.kept.dropped_at(layer, self.plan.image_tokens) if self.kept else 0
