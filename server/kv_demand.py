"""KV demand: the autoscaling signal that knows pruned requests hold fewer blocks.

vLLM's `vllm:num_requests_waiting` counts queued requests as equals, but an
unpruned image chat reserves about twice the KV blocks of a `feather` one
(README, KV capacity), so the queue length alone misjudges how much more
capacity a replica needs. The gateway knows each queued request's prompt
and pruning settings, and the engine knows its pool; at every scrape this
module exports (no labels: nothing from a request becomes a label value)

* `feather_kv_demand_blocks`: the blocks the requests waiting for their
  first token need for their prompts at their settings: what the scheduler
  reserves to admit them (each stage's upper bound of image tokens kept,
  summed per image as `feather_vllm.kv.scheduler_hook` does; an anyres
  image's bound is its layout's, from the image's size as the gateway
  loaded it);
* `feather_kv_free_blocks` and `feather_kv_total_blocks`: the engine's pool
  (from vLLM's own `vllm:kv_cache_usage_perc`);
* `feather_kv_demand_ratio`: (blocks in use + demand) / total. Below 1 the
  queue fits in the blocks free now; above 1 it has to wait for running
  requests to finish, however short the queue looks.

The block count of a request is vLLM's rule on the pool that
`feather_vllm.kv.specs` builds: each KV stage spans `size / smallest stage`
groups over one shared pool, and a group holds ceil(tokens at the stage's
first layer / block size) blocks. Requests the scheduler will run unpruned
after all (a prompt split by chunked prefill) are counted at their settings.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from feather_vllm.kv.plan import requested_config
from feather_vllm.pruning import config as pcfg
from feather_vllm.pruning.cost import kept_per_stage_max, layer_token_counts
from feather_vllm.pruning.layout import ImageLayout, LayoutRule, layout_kept_per_stage_max
from feather_vllm.pruning.selection import NonSquareGridError

USAGE_METRIC = "vllm:kv_cache_usage_perc"


@dataclasses.dataclass(frozen=True)
class KVPool:
    """The engine's KV block pool and its stage layout, as the gateway sees it."""

    block_size: int
    num_blocks: int  # usable blocks: vLLM's pool less its null block
    num_layers: int
    stages: tuple[tuple[int, int], ...]  # per KV stage: (its first decoder layer, the KV groups it spans)
    rule: LayoutRule  # the model's image-token layout (an anyres image's depends on its size)

    @classmethod
    def build(cls, num_layers: int, boundaries: Sequence[int], block_size: int, num_gpu_blocks: int,
              rule: LayoutRule) -> KVPool:
        """The pool of an engine with these stage `boundaries` (decoder
        layers where a KV stage starts) and `num_gpu_blocks` (vLLM's count)."""
        starts = [0, *boundaries]
        sizes = [end - start for start, end in zip(starts, [*boundaries, num_layers])]
        unit = min(sizes)  # vLLM groups every stage in groups of the smallest stage's layer count
        return cls(block_size=block_size, num_blocks=max(num_gpu_blocks - 1, 0), num_layers=num_layers,
                   stages=tuple((start, -(-size // unit)) for start, size in zip(starts, sizes)),
                   rule=rule)

    @classmethod
    def of_engine(cls, engine: Any) -> KVPool:
        """The pool of a running vLLM engine (its config, filled in at start-up)."""
        config = engine.vllm_config
        hf_config = config.model_config.hf_config
        num_layers = hf_config.text_config.num_hidden_layers
        boundaries = pcfg.kv_boundaries(getattr(hf_config, "feather_kv_boundaries", None), num_layers)
        return cls.build(num_layers, boundaries, config.cache_config.block_size,
                         config.cache_config.num_gpu_blocks or 0, LayoutRule.of(hf_config))

    @property
    def tokens_per_image(self) -> int:
        """LLaVA-1.5: one token per vision patch, the same for every image;
        0 for anyres models (an image's count depends on its size)."""
        return 0 if self.rule.needs_image_size else self.rule.layout(None).num_tokens

    def image_lengths(self, prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
        """Image placeholder tokens of each image in a prompt (adjacent images
        form one run of placeholders: split by the fixed count per image)."""
        per_image = self.tokens_per_image
        lengths = []
        for token, run in itertools.groupby(prompt_ids):
            if token == image_token_id:
                n = sum(1 for _ in run)
                if per_image and n % per_image == 0:
                    lengths += [per_image] * (n // per_image)
                else:
                    lengths.append(n)
        return lengths

    def images(self, prompt_ids: Sequence[int], image_token_id: int,
               image_sizes: Sequence[tuple[int, int]] = ()) -> list[int | ImageLayout]:
        """The prompt's images: their layouts, when the images' sizes (height,
        width) give layouts whose tokens are the prompt's image tokens (as
        the scheduler lays each image out); else their token counts."""
        lengths = self.image_lengths(prompt_ids, image_token_id)
        if not image_sizes:
            return list(lengths)
        layouts = [self.rule.layout(size) for size in image_sizes]
        if any(layout is None for layout in layouts) or sum(l.num_tokens for l in layouts) != sum(lengths):
            return list(lengths)
        return layouts  # type: ignore[return-value]


def request_blocks(pool: KVPool, config: pcfg.PruningConfig, images: Sequence[int | ImageLayout], num_tokens: int,
                   kept: Sequence[int] | None = None) -> int:
    """KV blocks a request of `num_tokens` tokens (images included) holds in
    `pool` under `config`: at each stage's upper bound of image tokens kept
    (what the scheduler reserves), or with `kept` (per stage, all images)
    what a finished cut really kept. `images`: each image's layout, or its
    token count (`KVPool.images`)."""
    image_tokens = sum(image if isinstance(image, int) else image.num_tokens for image in images)
    if kept is None and images and config.stages:
        per_image = [_kept_max(config, image) for image in images]
        kept = [sum(stage) for stage in zip(*per_image)]
    counts = layer_token_counts(config, pool.num_layers, image_tokens, num_tokens - image_tokens,
                                kept if image_tokens else None)
    return sum(groups * -(-counts[first] // pool.block_size) for first, groups in pool.stages)


def _kept_max(config: pcfg.PruningConfig, image: int | ImageLayout) -> list[int]:
    """Most tokens each stage keeps of an image: its layout's bound (the
    scheduler's); of an image known only by its token count, a square
    raster's (LLaVA-1.5), else all its tokens."""
    if not isinstance(image, int):
        return layout_kept_per_stage_max(config, image)
    try:
        return kept_per_stage_max(config, image)
    except NonSquareGridError:
        return [image] * len(config.stages)


class KVDemand(Collector):
    """The KV demand gauges, computed at each scrape from the gateway's
    requests in flight (`GatewayState.calls`) and vLLM's usage gauge."""

    def __init__(self) -> None:
        self.state: Any = None  # the GatewayState (server/app.py sets it)
        self._pool: KVPool | None = None
        self._pool_of: Any = None  # the engine the pool was read from
        self._blocks: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # scrapes run in worker threads

    def describe(self) -> list[GaugeMetricFamily]:
        # Named here so that registering never calls collect() (no engine yet).
        return list(self._families(0, 0, 0))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            demand, free, total = self.measure()
        return self._families(demand, free, total)

    def measure(self) -> tuple[int, int, int]:
        """(demand, free, total) blocks now; zeros before the engine runs."""
        state = self.state
        engine = getattr(state, "engine", None)
        if engine is None or state.layout is None:
            return 0, 0, 0
        if self._pool_of is not engine:
            self._pool, self._pool_of = KVPool.of_engine(engine), engine
        pool = self._pool
        demand = 0
        for call in list(state.calls):  # a copy: the event loop adds and removes calls meanwhile
            if call.first_token_at is None and not call.closed:
                blocks = self._blocks.get(call)
                if blocks is None:
                    blocks = self._blocks[call] = self._call_blocks(pool, call)
                demand += blocks
        used = round(_engine_usage() * pool.num_blocks)
        return demand, pool.num_blocks - used, pool.num_blocks

    def _call_blocks(self, pool: KVPool, call: Any) -> int:
        settings = requested_config(getattr(call.params, "extra_args", None), self.state.settings.default_preset,
                                    pool.num_layers)
        config = settings if isinstance(settings, pcfg.PruningConfig) else pcfg.PRESETS["none"]  # invalid: unpruned
        images = pool.images(call.prompt_ids, self.state.layout.image_token_id, call.image_sizes)
        return request_blocks(pool, config, images, len(call.prompt_ids))

    @staticmethod
    def _families(demand: int, free: int, total: int) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("feather_kv_demand_blocks", "KV blocks that the requests waiting for their first "
                                "token need for their prompts at their pruning settings", value=demand)
        yield GaugeMetricFamily("feather_kv_free_blocks", "KV blocks free in the engine's pool", value=free)
        yield GaugeMetricFamily("feather_kv_total_blocks", "KV blocks in the engine's pool", value=total)
        yield GaugeMetricFamily("feather_kv_demand_ratio", "(KV blocks in use + feather_kv_demand_blocks) / "
                                "blocks in the pool: above 1, the waiting requests do not fit in the blocks free",
                                value=(total - free + demand) / total if total else 0.0)


def _engine_usage() -> float:
    """vLLM's own `vllm:kv_cache_usage_perc` (0..1), read from the shared
    registry without collecting the rest (mean over engines: data-parallel ranks)."""
    values = [s.value for family in REGISTRY.restricted_registry([USAGE_METRIC]).collect()
              for s in family.samples if s.name == USAGE_METRIC]
    return sum(values) / len(values) if values else 0.0


COLLECTOR = KVDemand()
REGISTRY.register(COLLECTOR)  # once per process; create_app points it at its state
