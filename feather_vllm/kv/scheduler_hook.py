"""The scheduler side (vLLM internals, pinned version): the one decision
to prune or fall back, the plan's journey to the worker, and the report.

- `Scheduler._try_schedule_encoder_inputs` shapes chunked prefill for a
  request that asks for pruning: a chunk that would end between its first
  image and its last prompt token ends before the image (`chunk_end`). A
  follow-up that adds back (its hit covers its images) has its images
  encoded again, in the step that takes the rest of its prompt, and
  `NewRequestData.from_request` keeps their data for the worker.
- `KVCacheManager.get_computed_blocks`: a request that asks for pruning
  takes from the prefix cache either an earlier turn's pruned KV (its
  images and more, `kv.reuse`: the default for a follow-up turn), or only
  the text before its first image (the cut must compute every image token).
- `KVCacheManager.allocate_slots` sees the Request on the first step that
  reaches its first image: the decision is taken there, once per started prefill
  (a preempted request is freed and decides again on resume): cut, fall
  back, or reuse the hit found above. A plan sets the reservation of every
  stage manager; the request carries its `RequestPruning` (vLLM's
  `Request` object, so it lives exactly as long).
- `Scheduler.schedule` puts the plans decided in this step on the
  `SchedulerOutput` (`feather_plans`), which reaches every worker.
- `Scheduler.update_from_output` takes the kept tokens the worker returned
  in the runner output (`feather_kept`) onto their requests, trims their
  reservations, and (prefix caching on) records the decision so that later
  turns find its compacted blocks.
- `Scheduler._free_request` turns the request's pruning into a
  `PruningReport`, with the blocks each KV group really held, and hands it
  to the request's output in `kv_transfer_params["feather"]` (merged with
  a KV connector's parameters when there is one).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheManager

from feather_vllm.kv.plan import (
    REPORT_KEY,
    ImageSpan,
    KeptTokens,
    PrunePlan,
    PruningReport,
    Reused,
    United,
    requested_config,
)
from feather_vllm.kv.reuse import (
    CompactChain,
    Decision,
    DecisionIndex,
    Hit,
    find_hit,
    image_features,
)
from feather_vllm.kv.specs import StagedFullAttentionManager, StagedFullAttentionSpec
from feather_vllm.pruning.config import PRESETS, PruningConfig
from feather_vllm.pruning.layout import ImageLayout, layout_kept_per_stage_max
from feather_vllm.pruning.schedule import FallbackReason, chunk_end, decide

ATTR = "feather_pruning"  # the RequestPruning on vLLM's Request
SETTINGS_ATTR = "feather_settings"  # its resolved settings (PruningConfig | FallbackReason)
HIT_ATTR = "feather_hit"  # the reuse Hit its last prefix-cache lookup found, until allocated


@dataclasses.dataclass
class RequestPruning:
    """Scheduler-side pruning of one request, decided once."""

    config: PruningConfig
    image_tokens: tuple[int, ...]  # per image
    plan: PrunePlan | None = None
    fallback: FallbackReason | None = None
    kept: KeptTokens | None = None  # from the worker after the cutting step, or the reused turn's
    reused: Reused | None = None
    united: United | None = None  # the earlier turn whose kept set its cut keeps as well


def image_ranges(request: Any) -> list[tuple[int, int]]:
    """(offset, length) of each image placeholder, from the engine's own
    multimodal features (never from a scan of token ids)."""
    return [(f.mm_position.offset, f.mm_position.length) for f in image_features(request)]


def image_layouts(spec: StagedFullAttentionSpec, request: Any) -> list[ImageLayout | None]:
    """Each image's token layout, by the model's rule, from the size its
    processor recorded (`image_sizes`, anyres models); None where it cannot
    be known (no processed data in this process, or precomputed embeddings)."""
    rule = spec.feather_layout
    return [rule.layout(_image_size(f) if rule.needs_image_size else None, f.mm_position.length)
            for f in image_features(request)]


def _image_size(feature: Any) -> tuple[int, int] | None:
    data = feature.data
    if data is None or "image_sizes" not in data:
        return None
    height, width = data["image_sizes"].data.tolist()
    return int(height), int(width)


def _settings(spec: StagedFullAttentionSpec, request: Any) -> PruningConfig | FallbackReason:
    """The request's pruning settings, resolved once and kept on it."""
    settings = getattr(request, SETTINGS_ATTR, None)
    if settings is None:
        extra = request.sampling_params.extra_args if request.sampling_params else None
        settings = requested_config(extra, spec.feather_default, spec.feather_num_layers)
        setattr(request, SETTINGS_ATTR, settings)
    return settings


def _asks_pruning(spec: StagedFullAttentionSpec, request: Any) -> bool:
    settings = _settings(spec, request)
    return isinstance(settings, PruningConfig) and settings.enabled and bool(image_ranges(request))


def _decide(manager: KVCacheManager, spec: StagedFullAttentionSpec, request: Any, num_new_tokens: int,
            num_computed: int) -> RequestPruning:
    ranges = image_ranges(request)
    image_tokens = tuple(length for _, length in ranges)
    settings = _settings(spec, request)
    if isinstance(settings, FallbackReason):
        return RequestPruning(PRESETS["none"], image_tokens, fallback=settings)
    pruning = RequestPruning(settings, image_tokens)
    if not settings.enabled:
        return pruning
    layouts = image_layouts(spec, request)
    decision = decide(num_computed, num_new_tokens, request.num_prompt_tokens, ranges, layouts)
    if not decision.prune:
        pruning.fallback = decision.reason
        return pruning
    earlier = _earlier_decision(manager, settings, request) if settings.follow_up == "keep_both" else None
    # Each image keeps its own share (and an earlier turn's kept tokens, when
    # it keeps both): the stage bounds add up over images.
    per_image = [layout_kept_per_stage_max(settings, layout,
                                           [len(stage.per_image[i]) for stage in earlier.kept.stages]
                                           if earlier is not None else ())
                 for i, layout in enumerate(layouts)]
    if earlier is not None:
        pruning.united = United(earlier.request_id)
    pruning.plan = PrunePlan(settings, tuple(ImageSpan(o, n, layout) for (o, n), layout in zip(ranges, layouts)),
                             tuple(sum(stage) for stage in zip(*per_image)), life=request.num_preemptions,
                             unite=earlier.kept if earlier is not None else None)
    return pruning


def _earlier_decision(manager: KVCacheManager, settings: PruningConfig, request: Any) -> Decision | None:
    """The latest recorded cut of an earlier turn of the conversation
    `request` continues (its kept set, whether or not its KV is still
    cached), for a keep_both cut (`Decision.precedes`)."""
    if not manager.enable_caching:
        return None
    return next((d for d in manager._feather_decisions.candidates(settings, request) if d.precedes(request)),
                None)


def _reuse(spec: StagedFullAttentionSpec, request: Any, hit: Hit) -> RequestPruning:
    """A request that found an earlier turn's pruned KV: pruned like that
    turn, with its kept set, and no cut (adding back, where its hit says so,
    what its own criterion ranks highest of what that turn dropped)."""
    settings = _settings(spec, request)
    decision = hit.decision
    plan = PrunePlan(settings, decision.images, tuple(stage.total for stage in decision.kept.stages),
                     life=request.num_preemptions, reuse=decision.kept, add=hit.add,
                     insert_at=hit.tokens if hit.add else 0)
    return RequestPruning(settings, tuple(image.length for image in decision.images), plan=plan,
                          kept=decision.kept, reused=Reused(hit.tokens, decision.request_id, sum(hit.add)))


def _add_back(manager: KVCacheManager, settings: PruningConfig, request: Any, hit: Hit) -> tuple[int, ...]:
    """Per image, how many of the tokens `hit`'s turn dropped at the first
    cut `request` adds back (`PruningConfig.add_back_count`, at most all it
    dropped). Nothing where the decision was made for this very prompt (a
    request resumed after preemption finds its own: it must go on as it
    began), where no step can hold the rest of the prompt (the added
    tokens and the prompt's last token, whose criterion picks them, must
    share a step) or an image's embeddings do not map one to one onto its
    tokens."""
    if not hit.decision.precedes(request):
        return ()
    scheduler = getattr(manager, "_feather_scheduler", None)
    if scheduler is not None and request.num_tokens - hit.tokens > _max_chunk(scheduler, request):
        return ()
    if any(f.mm_position.is_embed is not None for f in image_features(request)):
        return ()
    first = hit.decision.kept.stages[0]
    return tuple(min(settings.add_back_count(image.length), image.length - len(kept))
                 for image, kept in zip(hit.decision.images, first.per_image))


def _find_reuse(manager: KVCacheManager, spec: StagedFullAttentionSpec, request: Any) -> Hit | None:
    """An earlier turn's pruned KV that `request` may take: under the
    "reuse" and "add_back" policies, and under "keep_both" where no step
    can hold its images and the rest of its prompt (a cut would fall back
    to unpruned: turn 1's selection is the better half of both). "reselect"
    cuts again."""
    settings = _settings(spec, request)
    cuts = settings.follow_up == "reselect" or (settings.follow_up == "keep_both" and _cut_fits(manager, request))
    if cuts or not manager.enable_caching or not manager.prefix_cache_lookup_enabled(request):
        return None
    managers = manager.coordinator.single_type_managers
    for decision in manager._feather_decisions.candidates(settings, request):
        hit = find_hit(managers, request, decision)
        if hit is not None:
            adds = _add_back(manager, settings, request, hit) if settings.follow_up == "add_back" else ()
            return dataclasses.replace(hit, add=adds) if any(adds) else hit
    return None


def _remember(manager: KVCacheManager, request: Any, pruning: RequestPruning) -> None:
    """A cut's kept set is known: record the decision, and hash its
    compacted blocks by it, so that the conversation's next turn finds them."""
    stages = _stage_managers(manager)
    if not manager.enable_caching or any(m.block_pool.hash_block_size != m.block_size for m in stages):
        return  # (the chains hash whole blocks with vLLM's per-block hashes before the image)
    decision = Decision.of(request, pruning.config, pruning.plan.images, pruning.kept)
    manager._feather_decisions.add(decision)
    for stage in stages:
        spec = stage.kv_cache_spec
        stage.follow(request.request_id,
                     CompactChain.of(decision, spec.feather_first_layer, spec.feather_end_layer, stage.block_size))


def _add_back_encoder_inputs(original: Any, scheduler: Any, request: Any, num_computed: int, num_new: int,
                             *args: Any, **kwargs: Any) -> Any:
    """`Scheduler._try_schedule_encoder_inputs` for a step that adds back:
    its images are encoded although the hit covers their tokens (the added
    tokens enter from their embeddings), and the step takes the rest of
    the prompt or nothing (the prompt's last token picks what is added)."""
    if num_computed + num_new < request.num_prompt_tokens:
        return original(scheduler, request, num_computed, 0, *args, **kwargs)  # wait for a step with room
    # Asked from the first image on, vLLM schedules every image's encoder
    # input (or finds it in the encoder cache).
    back = num_computed - image_ranges(request)[0][0]
    inputs, new, *rest = original(scheduler, request, num_computed - back, num_new + back, *args, **kwargs)
    if new - back < request.num_prompt_tokens - num_computed:  # an image cannot be encoded now
        return original(scheduler, request, num_computed, 0, *args, **kwargs)
    return inputs, new - back, *rest


def _reaches_image(request: Any, num_new_tokens: int, num_computed: int) -> bool:
    ranges = image_ranges(request)
    return bool(ranges) and num_computed < request.num_prompt_tokens and \
        num_computed + num_new_tokens > ranges[0][0]


def _max_chunk(scheduler: Any, request: Any) -> int:
    """The most prompt tokens any step can give `request` with all its
    images (0 when its images exceed the encoder's step budget)."""
    if sum(length for _, length in image_ranges(request)) > scheduler.max_num_encoder_input_tokens:
        return 0
    limit = scheduler.max_num_scheduled_tokens
    threshold = scheduler.scheduler_config.long_prefill_token_threshold
    return min(limit, threshold) if threshold > 0 else limit


def _cut_fits(manager: KVCacheManager, request: Any) -> bool:
    """Whether some step can hold `request`'s images and the rest of its
    prompt (what its cut needs, `chunk_end`); True where no scheduler has
    said its budgets yet."""
    scheduler = getattr(manager, "_feather_scheduler", None)
    rest = request.num_prompt_tokens - image_ranges(request)[0][0]
    return scheduler is None or rest <= _max_chunk(scheduler, request)


def _staged_spec(manager: KVCacheManager) -> StagedFullAttentionSpec | None:
    """The FEATHER model's spec, or None: every hook is inert without it."""
    spec = getattr(manager, "_feather_spec", False)
    if spec is False:
        spec = next((g.kv_cache_spec for g in manager.kv_cache_config.kv_cache_groups
                     if isinstance(g.kv_cache_spec, StagedFullAttentionSpec)), None)
        manager._feather_spec = spec
        manager._feather_new_plans = {}
        manager._feather_trims = {}  # request id -> {KV group: blocks it keeps}, for the worker
        manager._feather_decisions = DecisionIndex()
    return spec


def _stage_managers(manager: KVCacheManager) -> list[StagedFullAttentionManager]:
    return [m for m in manager.coordinator.single_type_managers if isinstance(m, StagedFullAttentionManager)]


def _forget(manager: KVCacheManager, request: Any) -> None:
    """The request's blocks are gone (finished or preempted): so is its
    decision; a resumed request re-prefills and decides again."""
    if getattr(request, ATTR, None) is not None:
        setattr(request, ATTR, None)
    if getattr(request, HIT_ATTR, None) is not None:
        setattr(request, HIT_ATTR, None)
    if _staged_spec(manager) is not None:
        manager._feather_new_plans.pop(request.request_id, None)
        manager._feather_trims.pop(request.request_id, None)


def _trim(manager: KVCacheManager, request: Any, pruning: RequestPruning) -> None:
    """The cut kept fewer image tokens than the plan reserved for: each stage
    frees its surplus blocks now, and the worker drops them from its block
    table before the next step adds any (`SchedulerOutput.feather_trims`)."""
    counts = {}
    for stage in _stage_managers(manager):
        dropped = pruning.kept.dropped_at(stage.kv_cache_spec.feather_first_layer, pruning.plan.image_tokens)
        kept_blocks = stage.trim(request.request_id, dropped, request.num_computed_tokens)
        if kept_blocks is not None:
            counts[stage.kv_cache_group_id] = kept_blocks
    if counts:
        manager._feather_trims[request.request_id] = counts


def _report(scheduler: Any, request: Any) -> PruningReport:
    kv = scheduler.kv_cache_manager
    pruning: RequestPruning | None = getattr(request, ATTR, None)
    if pruning is None:  # never reached an image step: text-only, or settings only
        settings = _settings(_staged_spec(kv), request)
        pruning = RequestPruning(settings if isinstance(settings, PruningConfig) else PRESETS["none"],
                                 tuple(length for _, length in image_ranges(request)),
                                 fallback=settings if isinstance(settings, FallbackReason) else None)
    held = tuple(len(blocks) for blocks in kv.get_block_ids(request.request_id))
    tokens = request.num_computed_tokens
    unpruned = tuple(-(-tokens // g.kv_cache_spec.block_size) for g in kv.kv_cache_config.kv_cache_groups)
    return PruningReport(
        preset=pruning.config.name, image_tokens=pruning.image_tokens,
        stages=pruning.kept.stages if pruning.kept else (),
        layouts=tuple(image.layout for image in pruning.plan.images) if pruning.plan else (),
        fallback=pruning.fallback, kv_blocks_held=held, kv_blocks_unpruned=unpruned, reused=pruning.reused,
        united=pruning.united)


def install() -> None:
    """Patch the scheduler and the KV-cache manager once per process."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(KVCacheManager, "_feather_patched", False):
        return
    KVCacheManager._feather_patched = True

    original_allocate = KVCacheManager.allocate_slots

    @functools.wraps(original_allocate)
    def allocate_slots(self, request, num_new_tokens, num_new_computed_tokens=0, *args, **kwargs):
        spec = _staged_spec(self)
        decided = None
        if spec is not None and getattr(request, ATTR, None) is None:
            computed = request.num_computed_tokens + num_new_computed_tokens + \
                kwargs.get("num_external_computed_tokens", 0)
            hit: Hit | None = getattr(request, HIT_ATTR, None)
            if hit is not None and computed == hit.tokens:
                decided = _reuse(spec, request, hit)
            elif _reaches_image(request, num_new_tokens, computed):
                decided = _decide(self, spec, request, num_new_tokens, computed)
            if decided is not None and decided.plan is not None:
                # An added-back turn's blocks past its hit hold the added
                # tokens, which the earlier turn's chain does not describe.
                chains = hit.chains if decided.reused and not decided.plan.adds_back else None
                for manager in _stage_managers(self):
                    manager.track(request.request_id, decided.plan,
                                  chains[manager.kv_cache_group_id] if chains else None)
        blocks = original_allocate(self, request, num_new_tokens, num_new_computed_tokens, *args, **kwargs)
        if decided is not None:
            if blocks is None:  # not scheduled: decide again next time
                for manager in _stage_managers(self):
                    manager.forget(request.request_id)
            else:
                setattr(request, ATTR, decided)
                setattr(request, HIT_ATTR, None)
                if decided.plan is not None:
                    self._feather_new_plans[request.request_id] = decided.plan
        return blocks

    KVCacheManager.allocate_slots = allocate_slots

    original_computed = KVCacheManager.get_computed_blocks

    @functools.wraps(original_computed)
    def get_computed_blocks(self, request, *args, **kwargs):
        spec = _staged_spec(self)
        if spec is None or not _asks_pruning(spec, request):
            return original_computed(self, request, *args, **kwargs)
        hit = _find_reuse(self, spec, request)
        setattr(request, HIT_ATTR, hit)
        if hit is not None:
            return self.create_kv_cache_blocks(hit.blocks), hit.tokens, 0
        # The cut must compute every image token: without a reusable turn, a
        # request that asks for pruning takes only the text before its first image.
        cap = image_ranges(request)[0][0]
        coordinator = self.coordinator
        find = coordinator.find_longest_cache_hit
        coordinator.find_longest_cache_hit = lambda hashes, max_len: find(hashes, min(max_len, cap))
        try:
            return original_computed(self, request, *args, **kwargs)
        finally:
            del coordinator.find_longest_cache_hit  # back to the class method

    KVCacheManager.get_computed_blocks = get_computed_blocks

    def forgetting(original_free):
        @functools.wraps(original_free)
        def free(self, request, *args, **kwargs):
            if _staged_spec(self) is not None and self.enable_caching:
                for stage in _stage_managers(self):
                    stage.cache_computed(request)
            _forget(self, request)
            return original_free(self, request, *args, **kwargs)

        return free

    for name in ("free", "pop_blocks_for_free"):
        setattr(KVCacheManager, name, forgetting(getattr(KVCacheManager, name)))

    original_schedule = Scheduler.schedule

    @functools.wraps(original_schedule)
    def schedule(self, *args, **kwargs):
        staged = _staged_spec(self.kv_cache_manager) is not None
        if staged:
            self.kv_cache_manager._feather_scheduler = self  # its step budgets, for the prefix-cache lookup
        output = original_schedule(self, *args, **kwargs)
        if staged:
            output.feather_plans = self.kv_cache_manager._feather_new_plans
            output.feather_trims = self.kv_cache_manager._feather_trims
            self.kv_cache_manager._feather_new_plans = {}
            self.kv_cache_manager._feather_trims = {}
        return output

    Scheduler.schedule = schedule

    original_encoder = Scheduler._try_schedule_encoder_inputs

    @functools.wraps(original_encoder)
    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs):
        spec = _staged_spec(self.kv_cache_manager)
        undecided = spec is not None and getattr(request, ATTR, None) is None
        hit: Hit | None = getattr(request, HIT_ATTR, None)
        if undecided and hit is not None and hit.add and num_computed_tokens == hit.tokens:
            return _add_back_encoder_inputs(original_encoder, self, request, num_computed_tokens,
                                            num_new_tokens, *args, **kwargs)
        if undecided and _asks_pruning(spec, request):
            num_new_tokens = chunk_end(num_computed_tokens, num_new_tokens, request.num_prompt_tokens,
                                       image_ranges(request)[0][0], _max_chunk(self, request))
        return original_encoder(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs)

    Scheduler._try_schedule_encoder_inputs = _try_schedule_encoder_inputs

    from vllm.v1.core.sched.output import NewRequestData

    original_new_request = NewRequestData.from_request.__func__

    @functools.wraps(original_new_request)
    def from_request(cls, request, *args, **kwargs):
        data = original_new_request(cls, request, *args, **kwargs)
        pruning = getattr(request, ATTR, None)
        if pruning is not None and pruning.plan is not None and pruning.plan.adds_back:
            # vLLM strips the data of images its prefix-cache hit covers (no
            # encoder run could need it): this step encodes them again.
            data.mm_features = request.mm_features
        return data

    NewRequestData.from_request = classmethod(from_request)

    original_update = Scheduler.update_from_output

    @functools.wraps(original_update)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        for request_id, kept in (getattr(model_runner_output, "feather_kept", None) or {}).items():
            request = self.requests.get(request_id)
            pruning = getattr(request, ATTR, None) if request is not None else None
            # Only the cut of this life's plan: a step that cut before a
            # preemption may report after it (async scheduling).
            if pruning is not None and pruning.plan is not None and kept.life == pruning.plan.life:
                pruning.kept = kept
                if not pruning.plan.adds_back:  # (its reservation was exact, its layout is no cut's)
                    _trim(self.kv_cache_manager, request, pruning)
                    _remember(self.kv_cache_manager, request, pruning)
        return original_update(self, scheduler_output, model_runner_output, *args, **kwargs)

    Scheduler.update_from_output = update_from_output

    original_free_request = Scheduler._free_request

    @functools.wraps(original_free_request)
    def _free_request(self, request, *args, **kwargs):
        report = _report(self, request) if _staged_spec(self.kv_cache_manager) is not None else None
        kv_params, ec_params = original_free_request(self, request, *args, **kwargs)
        if report is not None:
            kv_params = {**(kv_params or {}), REPORT_KEY: report.to_dict()}
        return kv_params, ec_params

    Scheduler._free_request = _free_request
