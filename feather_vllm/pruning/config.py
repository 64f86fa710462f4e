"""Pruning settings: ordered stages, presets and validation.

Every method fits one shape (FEATHER_SPEC.md): an ordered list of stages,
each = (layer where the cut takes effect, keep fraction, criterion, optional
uniform-grid stride). A stage's keep fraction applies to the image tokens
that enter it (the previous stage's survivors), so PyramidDrop's 0.5, 0.5,
0.5 halves each time and FEATHER's stage 2 keeps int(N1 * 0.09).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Criterion = Literal["rope", "rope_free"]
CRITERIA: tuple[str, ...] = ("rope", "rope_free")
# What a follow-up turn about an image an earlier turn pruned does with that
# turn's selection (made for that turn's question):
# - "reuse": takes its pruned KV and kept set from the prefix cache; no cut.
# - "reselect": prunes again for this turn's prompt, at full cost.
# - "keep_both": prunes again at full cost and keeps, at every stage, what
#   this prompt's criterion selects and what the earlier turn kept.
# - "add_back": keeps both for less than a cut costs: takes the earlier
#   turn's pruned KV and adds back, after the tokens taken from the cache,
#   the image tokens it dropped that this prompt's criterion ranks highest
#   (the `add_back` share of each image, else as many as the first stage
#   keeps); docs/multi_turn_reuse.md.
# (Those that cut nothing first: tools/evaluate asks them in this order.)
FollowUp = Literal["reuse", "add_back", "reselect", "keep_both"]
FOLLOW_UPS: tuple[str, ...] = ("reuse", "add_back", "reselect", "keep_both")


class PruningConfigError(ValueError):
    """Invalid pruning settings. `field` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class Stage:
    """One cut: entering decoder layer `layer`, keep `keep` of the image
    tokens that are still present, ranked by `criterion` (scored at layer
    `layer - 1`), united with every `grid_stride`-th row and column of the
    patch grid when `grid_stride` is set."""

    layer: int
    keep: float
    criterion: Criterion = "rope_free"
    grid_stride: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    """An ordered, validated list of stages. No stage = no pruning."""

    stages: tuple[Stage, ...] = ()
    name: str = "custom"
    # A policy for follow-up turns (FollowUp), not part of what is kept. By
    # default a follow-up keeps both selections: reusing turn 1's costs
    # answers where the cut precedes the layer in which the model finds
    # what the new question asks about (README, "What reuse costs in
    # answers"). The feather preset reuses: measured, it loses none. FastV
    # adds back: measured, its answers gain most, at less cost than a cut.
    follow_up: FollowUp = "keep_both"
    # Under "add_back": the share of each image's tokens a follow-up adds
    # back (each added token runs through every layer after the first cut:
    # fewer cost less and answer less well); None: the first stage's `keep`.
    add_back: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.stages)

    @property
    def cut_layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.stages)

    def validate(self, num_layers: int | None = None) -> "PruningConfig":
        """Raise PruningConfigError unless the stages are well formed.

        `num_layers` (the decoder depth) bounds the cut layers: a cut at L
        needs scores from layer L-1 >= 0 and a layer L < num_layers to apply.
        """
        previous = 0
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if isinstance(stage.layer, bool) or not isinstance(stage.layer, int):
                raise PruningConfigError(f"{where}.layer", "must be an integer")
            if stage.layer < 1:
                raise PruningConfigError(
                    f"{where}.layer", f"must be >= 1 (scores come from layer L-1), got {stage.layer}")
            if num_layers is not None and stage.layer >= num_layers:
                raise PruningConfigError(
                    f"{where}.layer",
                    f"must be < {num_layers} (the model's decoder layers), got {stage.layer}")
            if stage.layer <= previous:
                raise PruningConfigError(
                    f"{where}.layer", f"cut layers must strictly increase, got {stage.layer} after {previous}")
            previous = stage.layer
            keep = stage.keep
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
                raise PruningConfigError(f"{where}.keep", f"must be in (0, 1], got {keep!r}")
            if stage.criterion not in CRITERIA:
                raise PruningConfigError(
                    f"{where}.criterion", f"must be one of {list(CRITERIA)}, got {stage.criterion!r}")
            stride = stage.grid_stride
            if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
                raise PruningConfigError(f"{where}.grid_stride", f"must be a positive integer, got {stride!r}")
        if self.follow_up not in FOLLOW_UPS:
            raise PruningConfigError("follow_up", f"must be one of {list(FOLLOW_UPS)}, got {self.follow_up!r}")
        share = self.add_back
        if share is not None:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) <= 1.0:
                raise PruningConfigError("add_back", f"must be in (0, 1], got {share!r}")
            if self.follow_up != "add_back":
                raise PruningConfigError("add_back", f"applies to follow_up 'add_back', not {self.follow_up!r}")
        return self

    def add_back_count(self, image_tokens: int) -> int:
        """How many tokens a follow-up adds back to an image of `image_tokens`
        (at most what the earlier turn dropped: the caller's bound)."""
        share = self.add_back if self.add_back is not None else self.stages[0].keep
        return max(1, int(image_tokens * share))

    def to_dict(self) -> dict[str, Any]:
        out = {"preset": self.name, "stages": [s.to_dict() for s in self.stages], "follow_up": self.follow_up}
        return out if self.add_back is None else {**out, "add_back": self.add_back}

    @classmethod
    def from_stages(cls, stages: Sequence[Mapping[str, Any] | Stage], name: str = "custom") -> "PruningConfig":
        out = []
        for i, raw in enumerate(stages):
            if isinstance(raw, Stage):
                out.append(raw)
                continue
            if not isinstance(raw, Mapping):
                raise PruningConfigError(f"stages[{i}]", "must be an object")
            unknown = set(raw) - {f.name for f in dataclasses.fields(Stage)}
            if unknown:
                raise PruningConfigError(f"stages[{i}]", f"unknown keys {sorted(unknown)}")
            for required in ("layer", "keep"):
                if required not in raw:
                    raise PruningConfigError(f"stages[{i}].{required}", "is required")
            out.append(Stage(**raw))
        return cls(tuple(out), name).validate()


PRESETS: dict[str, PruningConfig] = {
    "none": PruningConfig((), "none"),
    # FastV: K=3, R=0.75, RoPE criterion.
    "fastv": PruningConfig((Stage(3, 0.25, "rope"),), "fastv", follow_up="add_back"),
    # FEATHER: RoPE-free criterion, stride-3 grid in stage 1, two cuts.
    "feather": PruningConfig(
        (Stage(8, 0.30, "rope_free", 3), Stage(16, 0.09, "rope_free")), "feather", follow_up="reuse"),
    # PyramidDrop: halve at 8, 16 and 24, RoPE criterion, no grid.
    "pyramiddrop": PruningConfig(
        (Stage(8, 0.5, "rope"), Stage(16, 0.5, "rope"), Stage(24, 0.5, "rope")), "pyramiddrop"),
}


def resolve(spec: "str | Mapping[str, Any] | PruningConfig | None",
            default: "PruningConfig | None" = None) -> PruningConfig:
    """Turn a preset name, a {"preset", "stages", "follow_up"} mapping or a
    config into a validated PruningConfig. None means `default` (or no
    pruning).

    Explicit `stages` win over `preset`; the preset then only names the run.
    `follow_up` sets the follow-up policy (else the preset's; explicit
    stages: "keep_both"); `"reselect": true` is another spelling of
    `"follow_up": "reselect"`; `add_back` the share an "add_back"
    follow-up adds back.
    """
    if spec is None:
        return default if default is not None else PRESETS["none"]
    if isinstance(spec, PruningConfig):
        return spec.validate()
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise PruningConfigError("preset", f"unknown preset {spec!r}; choose from {sorted(PRESETS)}")
        return PRESETS[spec]
    if not isinstance(spec, Mapping):
        raise PruningConfigError("feather", "must be a preset name or an object with 'preset' and/or 'stages'")
    unknown = set(spec) - {"preset", "stages", "follow_up", "reselect", "add_back"}
    if unknown:
        raise PruningConfigError("feather", f"unknown keys {sorted(unknown)}")
    follow_up = _follow_up(spec)
    config = _resolve_stages(spec, default)
    if not config.enabled:
        return config
    if follow_up is not None:
        config = dataclasses.replace(config, follow_up=follow_up)
    if spec.get("add_back") is not None:
        config = dataclasses.replace(config, add_back=spec["add_back"])
    return config.validate()


def _follow_up(spec: Mapping[str, Any]) -> str | None:
    """The mapping's follow-up policy, None where it names none."""
    reselect = spec.get("reselect", False)
    if not isinstance(reselect, bool):
        raise PruningConfigError("reselect", f"must be true or false, got {reselect!r}")
    follow_up = spec.get("follow_up")
    if follow_up is not None and follow_up not in FOLLOW_UPS:
        raise PruningConfigError("follow_up", f"must be one of {list(FOLLOW_UPS)}, got {follow_up!r}")
    if reselect and follow_up not in (None, "reselect"):
        raise PruningConfigError("reselect", f"contradicts follow_up {follow_up!r}")
    return "reselect" if reselect else follow_up


def _resolve_stages(spec: Mapping[str, Any], default: "PruningConfig | None") -> PruningConfig:
    preset = spec.get("preset")
    stages = spec.get("stages")
    if stages is not None:
        if not isinstance(stages, Sequence) or isinstance(stages, (str, bytes)):
            raise PruningConfigError("stages", "must be a list of stages")
        name = preset if isinstance(preset, str) else "custom"
        return PruningConfig.from_stages(stages, name)
    if preset is None:
        return default if default is not None else PRESETS["none"]
    if not isinstance(preset, str):
        raise PruningConfigError("preset", "must be a string")
    return resolve(preset)


KV_STAGE_LAYERS = 4  # default layers per KV-cache stage


def kv_boundaries(configured: Sequence[int] | None, num_layers: int) -> list[int]:
    """Decoder layers where a new KV-cache stage starts.

    `configured` (the model config's `feather_kv_boundaries`) sets them. The
    default cuts the decoder into equal stages of about `KV_STAGE_LAYERS`
    layers (the divisor of `num_layers` nearest to it): equal stages are
    what vLLM groups without padding layers, and every preset's cut layer
    (3, 8, 16, 24 on 32 layers) is then at most 3 layers before a boundary.
    A cut inside a stage still saves its compute from the cut on, and its KV
    from the next boundary on. `[]` keeps one KV group (no KV savings).
    """
    if configured is None:
        divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        size = min(divisors, key=lambda d: (abs(d - KV_STAGE_LAYERS), -d))
        configured = range(size, num_layers, size)
    return sorted(b for b in set(configured) if 0 < b < num_layers)


def has_padding_free_stages(boundaries: Sequence[int], num_layers: int) -> bool:
    """True when every KV stage's layer count is a multiple of the smallest:
    vLLM then splits the stages into equal groups with no padding layers."""
    starts = [0, *boundaries]
    sizes = [end - start for start, end in zip(starts, [*boundaries, num_layers])]
    return all(size % min(sizes) == 0 for size in sizes)
