"""FEATHER's variants of vLLM's LLaVA-family models: a pruned prefill.

The scheduler decides, once, which requests are pruned and sends each a
plan (feather_vllm/kv/plan.py) with the step that computes its image and
last prompt token. In that step this model cuts: at a cut entering layer L
the image tokens still present are scored from layer L-1 (the last prompt
token's query against their keys), the losers' rows are removed from the
hidden states, residual and positions, and the attention metadata of
layers >= L is rebuilt so that their KV cache holds only the survivors, in
order, at compact slots. Kept tokens keep their original positions (RoPE)
and generated tokens continue from the unpruned length.

A follow-up turn that adds back (follow_up "add_back") runs this step too,
without a cut of its own: it reads an earlier turn's compact KV, and the
image tokens that turn dropped at the first cut join the step as probes
(one-token queries through the layers before the cut); its last prompt
token ranks them there and the chosen ones stay, after its cached tokens.

Every other step (decode, unpruned prefills) runs vLLM's own LLaVA
forward, compiled where vLLM compiles; `feather_vllm.kv` gives the layers
after each cut their compact metadata.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    get_tp_group,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from feather_vllm.cutting_layer import CuttingLayers, compiles
from feather_vllm.kv import guards, specs
from feather_vllm.kv import step as kv_step
from feather_vllm.kv.plan import ImageSpan, KeptTokens, StageKept, in_effect
from feather_vllm.pruning import config as pcfg
from feather_vllm.pruning.scoring import last_token_image_attention
from feather_vllm.pruning.layout import LayoutRule, select_stage_layout

logger = logging.getLogger(__name__)

DEFAULT_PRESET_ENV = "FEATHER_DEFAULT_PRESET"


def kv_boundaries(hf_config: Any, num_layers: int) -> list[int]:
    """The KV stage boundaries set for this model (hf_overrides
    `feather_kv_boundaries`), or the padding-free default."""
    return pcfg.kv_boundaries(getattr(hf_config, "feather_kv_boundaries", None), num_layers)


@dataclasses.dataclass
class _Cutting:
    """One request's images through the layers of a cutting step."""

    images: tuple[ImageSpan, ...]
    stages: list[pcfg.Stage]  # stages still to cut in this step
    kept: list[tuple[int, list[torch.Tensor]]]  # (cut layer, kept indices per image), done so far
    # cut layer -> per image, what an earlier turn kept there, kept here too (follow_up "keep_both")
    also: dict[int, list[torch.Tensor]] = dataclasses.field(default_factory=dict)

    def present(self, layer: int) -> list[torch.Tensor]:
        """Per image, its tokens present in `layer` (0-based within the image)."""
        i = in_effect([cut for cut, _ in self.kept], layer)
        return [torch.arange(image.length) for image in self.images] if i is None else self.kept[i][1]

    def dropped_positions(self, layer: int) -> torch.Tensor:
        """Absolute positions of the image tokens absent from `layer`, ascending."""
        return torch.cat([_absent(image.length, present) + image.offset
                          for image, present in zip(self.images, self.present(layer))])

    def added(self, layer: int) -> int:
        """Rows added before the request's own in `layer`: none (a cut adds nothing)."""
        return 0

    @classmethod
    def of(cls, req: kv_step.RequestSlice) -> "_Cutting | None":
        if req.pruning is None:
            return None
        plan = req.pruning.plan
        if req.cuts_now:
            also = dict(_kept_tensors(plan.unite)) if plan.unite is not None else {}
            return cls(plan.images, list(plan.config.stages), [], also)
        if req.pruning.kept is None:
            return None
        return cls(plan.images, [], _kept_tensors(req.pruning.kept))


@dataclasses.dataclass
class _AddingBack:
    """One request's step that reuses an earlier turn's pruned KV and adds
    back image tokens that turn dropped (follow_up "add_back"): those
    dropped at the first cut are recomputed through the layers before it
    as probes (one-token queries at their positions over the cached KV),
    the prompt's last token ranks them in the layer before the cut, and
    from the cut on each image's top `add` follow the cached tokens, at
    their own positions, before the request's own rows."""

    images: tuple[ImageSpan, ...]
    earlier: KeptTokens  # the earlier turn's kept sets, whose pruned KV it reads
    stage: pcfg.Stage  # the first stage: its layer and criterion
    add: tuple[int, ...]  # per image, how many to add back
    candidates: list[torch.Tensor]  # per image, what `earlier` dropped at the first cut (0-based, ascending)
    keys: torch.Tensor | None = None  # the probes' row keys
    chosen: list[torch.Tensor] | None = None  # per image, the tokens added back (0-based, ascending)

    def dropped_positions(self, layer: int) -> torch.Tensor:
        """Absolute positions of the image tokens the earlier turn's KV lacks at `layer`."""
        return torch.tensor(self.earlier.dropped_positions(layer, self.images), dtype=torch.long)

    def added(self, layer: int) -> int:
        """Added-back rows present in `layer`."""
        return sum(c.numel() for c in self.chosen) if self.chosen is not None and layer >= self.stage.layer else 0

    def probe_positions(self) -> torch.Tensor:
        return torch.cat([c + image.offset for c, image in zip(self.candidates, self.images)])

    def kept(self) -> KeptTokens:
        """The earlier turn's kept sets with the added tokens, per stage."""
        assert self.chosen is not None
        return KeptTokens(tuple(
            StageKept(stage.layer, tuple(tuple(sorted(set(kept) | set(chosen.tolist())))
                                         for kept, chosen in zip(stage.per_image, self.chosen)))
            for stage in self.earlier.stages))

    @classmethod
    def of(cls, req: kv_step.RequestSlice) -> "_AddingBack":
        plan = req.pruning.plan
        earlier = plan.reuse
        first = earlier.stages[0]
        candidates = [_absent(image.length, torch.tensor(kept, dtype=torch.long))
                      for image, kept in zip(plan.images, first.per_image)]
        return cls(plan.images, earlier, plan.config.stages[0], plan.add, candidates)


def _absent(length: int, present: torch.Tensor) -> torch.Tensor:
    """An image's token indices (of `length`) not in `present`, ascending."""
    mask = torch.ones(length, dtype=torch.bool)
    mask[present] = False
    return torch.nonzero(mask).flatten()


def _state_of(req: kv_step.RequestSlice) -> "_Cutting | _AddingBack | None":
    """What the step does with request `req`'s rows: cut, add back, read
    compact KV (a `_Cutting` with its kept sets), or nothing (None)."""
    return _AddingBack.of(req) if req.adds_back else _Cutting.of(req)


def _kept_tensors(kept: KeptTokens) -> list[tuple[int, list[torch.Tensor]]]:
    """(cut layer, kept indices per image) of each stage of `kept`."""
    return [(stage.layer, [torch.tensor(k, dtype=torch.long) for k in stage.per_image]) for stage in kept.stages]


class FeatherPruning:
    """The pruned prefill, mixed into a vLLM LLaVA-family model class whose
    text model (`self.language_model.model`) is a Llama-style decoder
    (Llama, Mistral, Qwen2: the same layer structure). Put
    it before the vLLM class: its `forward` runs the cutting step and hands
    every other step to the vLLM class's own."""

    language_model: Any

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        guards.check(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        config = vllm_config.model_config.hf_config
        self.num_decoder_layers = config.text_config.num_hidden_layers
        default = getattr(config, "feather_default", None) or os.environ.get(DEFAULT_PRESET_ENV)
        pcfg.resolve(default).validate(self.num_decoder_layers)
        self._tp = get_tensor_model_parallel_world_size()
        guards.check_text_model(self.language_model)
        guards.check_attention_backends(self.language_model)
        self.kv_boundaries = kv_boundaries(config, self.num_decoder_layers)
        if not pcfg.has_padding_free_stages(self.kv_boundaries, self.num_decoder_layers):
            logger.warning("KV stage boundaries %s make vLLM pad KV groups: equal stages avoid it",
                           self.kv_boundaries)
        rule = LayoutRule.of(config)
        specs.stage_attention_layers(list(self.language_model.model.layers), self.kv_boundaries,
                                     self.num_decoder_layers, default, rule)
        step, most = vllm_config.scheduler_config.max_num_batched_tokens, rule.most_tokens()
        if most >= step:
            # The cut needs an image and the last prompt token in one step.
            logger.warning("images of up to %d tokens do not fit one step of %d tokens: requests with such an "
                           "image run unpruned (prompt_split); raise --max-num-batched-tokens above %d to prune "
                           "them", most, step, most)
        self._layers = CuttingLayers(self.language_model.model.layers, compiles(vllm_config))

    def process_weights_after_loading(self) -> None:
        # vLLM's model-level hook after loading: the layers' weights are in
        # their runtime form only now (a CPU linear's GEMM is set up after
        # load_weights), and the cutting step's graphs trace them.
        self._layers.warm_up()

    # -- forward -----------------------------------------------------------

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        batch = kv_step.current()
        if batch is not None and intermediate_tensors is None:
            return self._pruned_forward(input_ids, positions, inputs_embeds, batch)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def _pruned_forward(self, input_ids, positions, inputs_embeds, batch):
        """The forward of a step in which some requests cut (their plans came
        with it) or add back; the batch's other pruned requests read compact KV."""
        lm = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        total_rows = hidden.shape[0]
        keys = kv_step.row_keys(torch.arange(total_rows, device=hidden.device))  # order of the current rows
        states = [_state_of(req) for req in batch.requests]
        adders = [(i, a) for i, a in enumerate(states) if isinstance(a, _AddingBack)]
        probes = []
        if adders:
            hidden, positions, keys, probes = self._with_probes(batch, adders, hidden, positions, keys)
        hidden, positions = self._layers.inputs(hidden, positions)
        residual = None
        cuttings = [(i, c) for i, c in enumerate(states) if isinstance(c, _Cutting)]
        cuts = sorted({s.layer for _, c in cuttings for s in c.stages} |
                      {layer for _, c in cuttings for layer, _ in c.kept} |
                      {s.layer for _, a in adders for s in a.earlier.stages})
        if probes:
            self._retarget_attention(lm, batch, states, keys, positions, lm.start_layer,
                                     next((c for c in cuts if c > lm.start_layer), lm.end_layer), probes)

        for idx in range(lm.start_layer, lm.end_layer):
            scorers = [(i, c) for i, c in cuttings if any(s.layer == idx + 1 for s in c.stages)]
            adding = [(i, a) for i, a in adders if a.stage.layer == idx + 1]
            if scorers or adding:
                hidden, residual, scores = self._layer_with_scores(
                    idx, positions, hidden, residual, keys, batch, scorers, adding)
            else:
                hidden, residual, _, _ = self._layers(idx, positions, hidden, residual)
            if idx + 1 not in cuts or idx + 1 >= lm.end_layer:
                continue
            if scorers or adding:
                keep = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
                for i, cutting in scorers:
                    req = batch.requests[i]
                    stage = next(s for s in cutting.stages if s.layer == idx + 1)
                    # Each image keeps its own top fraction (and grid) of its own tokens.
                    kept = []
                    also = cutting.also.get(idx + 1, [None] * len(cutting.images))
                    for image, before, image_scores, earlier in zip(cutting.images, cutting.present(idx),
                                                                    scores[i], also):
                        after = self._same_on_every_rank(
                            select_stage_layout(image_scores, before, stage, image.layout), image.length,
                            keys.device)
                        if earlier is not None:  # all present: a subset of its previous stage's, kept here
                            after = torch.unique(torch.cat([after, earlier]))
                        kept.append(after)
                        dropped = before[~torch.isin(before, after)]
                        dropped_rows = req.row_start + image.offset + dropped - req.num_computed
                        keep &= ~torch.isin(keys, kv_step.row_keys(dropped_rows).to(keys.device))
                    cutting.kept.append((idx + 1, kept))
                if adding:
                    keys = self._add_back(batch, adding, scores, keys, keep)
                    probes = [p for p in probes if not any(p.request == i for i, _ in adding)]
                hidden, residual = hidden[keep], residual[keep]
                positions, keys = positions[keep], keys[keep]
                if adding:  # added rows move before their request's own
                    order = torch.argsort(keys, stable=True)
                    hidden, residual, positions, keys = hidden[order], residual[order], positions[order], keys[order]
            next_cut = next((c for c in cuts if c > idx + 1), lm.end_layer)
            self._retarget_attention(lm, batch, states, keys, positions, idx + 1, next_cut, probes)

        for req, state in zip(batch.requests, states):
            if isinstance(state, _AddingBack):
                req.pruning.kept = dataclasses.replace(state.kept(), life=req.pruning.plan.life)
            elif req.cuts_now and state is not None:
                req.pruning.kept = KeptTokens(tuple(StageKept(layer, tuple(tuple(k.tolist()) for k in kept))
                                                    for layer, kept in state.kept), life=req.pruning.plan.life)

        hidden, _ = lm.norm(hidden, residual)
        if not adders and keys.shape[0] == total_rows:
            return hidden
        # Logits are read at step-row indices: put the step's rows back in place.
        out = hidden.new_zeros((total_rows, hidden.shape[1]))
        step_rows = kv_step.is_step_row(keys)
        out[keys[step_rows] // kv_step.ROW_STRIDE] = hidden[step_rows]
        return out

    def _with_probes(self, batch, adders, hidden, positions, keys):
        """The step's rows headed by each adding request's probes: the image
        tokens its earlier turn dropped at the first cut, from their
        embeddings, at their positions, under negative keys."""
        embeds, probes = [], []
        for i, adding in adders:
            req = batch.requests[i]
            embeds += [e[c.to(e.device)] for e, c in zip(batch.image_embeds(req), adding.candidates)]
            probes.append(kv_step.Probes(i, adding.probe_positions()))
        count = sum(p.count for p in probes)
        probe_keys = torch.arange(-count, 0, device=keys.device)
        at = 0
        for (_, adding), p in zip(adders, probes):
            adding.keys, at = probe_keys[at:at + p.count], at + p.count
        return (torch.cat([*(e.to(hidden.dtype) for e in embeds), hidden]),
                torch.cat([*(p.positions.to(positions.device, positions.dtype) for p in probes), positions]),
                torch.cat([probe_keys, keys]), probes)

    def _add_back(self, batch, adders, scores, keys, keep):
        """Each adding request keeps each image's top `add` probes by score
        (ties: the lower index) and drops the rest (`keep`); the kept ones
        take keys just before the request's own rows. Returns the new keys."""
        ordered, keys = keys, keys.clone()  # (the probes are found in the ordered keys)
        for i, adding in adders:
            chosen, mask = [], []
            for candidates, image, count, image_scores in zip(adding.candidates, adding.images, adding.add,
                                                              scores[i]):
                order = torch.sort(image_scores.float(), descending=True, stable=True).indices
                top = self._same_on_every_rank(candidates[order[:count]], image.length, keys.device)
                chosen.append(top)
                mask.append(torch.isin(candidates, top))
            adding.chosen = chosen
            mask = torch.cat(mask).to(keys.device)
            at = torch.searchsorted(ordered, adding.keys)
            keep[at[~mask]] = False
            start = batch.requests[i].row_start * kv_step.ROW_STRIDE
            keys[at[mask]] = start + torch.arange(int(mask.sum()), device=keys.device)
        return keys

    def _same_on_every_rank(self, kept: torch.Tensor, image_len: int, device: torch.device) -> torch.Tensor:
        """Rank 0's selection on every tensor-parallel rank: ranks then keep
        the same tokens by construction, not by bitwise-equal all-reduces."""
        if self._tp == 1:
            return kept
        mask = torch.zeros(image_len, dtype=torch.int32, device=device)
        mask[kept.to(device)] = 1
        mask = get_tp_group().broadcast(mask, src=0)
        return torch.nonzero(mask.cpu()).flatten()

    def _layer_with_scores(self, idx, positions, hidden, residual, keys, batch, scorers, adding):
        """Decoder layer `idx` that also scores image tokens for the requests
        cutting (`scorers`) or adding back (`adding`, their probes) at
        `idx + 1`: the last prompt token's query against each image's keys,
        with or without RoPE as the stage's criterion says."""
        cut = idx + 1
        picks, sizes, stages = {}, {}, {}
        for i, state in scorers:
            req = batch.requests[i]
            present = state.present(cut - 1)
            sizes[i] = [p.numel() for p in present]
            stages[i] = next(s for s in state.stages if s.layer == cut)
            image_rows = torch.cat([req.row_start + image.offset + p - req.num_computed
                                    for image, p in zip(state.images, present)])
            picks[i] = kv_step.row_keys(image_rows).to(keys.device)
        for i, state in adding:
            sizes[i], stages[i], picks[i] = [c.numel() for c in state.candidates], state.stage, state.keys
        for i in picks:
            req = batch.requests[i]
            last = kv_step.row_keys(torch.tensor([req.row_start + req.prompt_len - 1 - req.num_computed]))
            picks[i] = (torch.searchsorted(keys, last.to(keys.device)), torch.searchsorted(keys, picks[i]))
        hidden, residual, raw, roped = self._layers(idx, positions, hidden, residual, picks)

        scores = {}
        attn = self.language_model.model.layers[idx].self_attn
        head_dim, scaling = attn.head_dim, attn.scaling
        for i in picks:
            q_last, k_img = (roped if stages[i].criterion == "rope" else raw)[i]
            q_last = q_last.reshape(-1, head_dim)
            # Each image is scored on its own: softmax over its own keys.
            s = torch.cat([last_token_image_attention(q_last, k.reshape(k.shape[0], -1, head_dim), scaling)
                           for k in k_img.split(sizes[i])])
            if self._tp > 1:
                # Each rank holds a slice of the heads: average over all heads.
                local_heads = q_last.shape[0]
                s = tensor_model_parallel_all_reduce(s * local_heads) / (local_heads * self._tp)
            scores[i] = s.cpu().split(sizes[i])
        return hidden, residual, scores

    def _retarget_attention(self, lm, batch, states, keys, positions, start, stop, probes):
        """Layers [start, stop) attend over the rows (and compact KV) they keep."""
        names = [lm.layers[i].self_attn.attn.layer_name for i in range(start, stop)]
        dropped = [s.dropped_positions(start) if s is not None else None for s in states]
        added = [s.added(start) if s is not None else 0 for s in states]
        batch.retarget(names, keys, positions, dropped, added, probes)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor,
    info=_build_llava_or_pixtral_hf_info,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FeatherLlavaForConditionalGeneration(FeatherPruning, LlavaForConditionalGeneration):
    """LLaVA-1.5 whose prefill prunes image tokens in stages (FEATHER, FastV,
    PyramidDrop or explicit stages), with pruned layers' KV compacted."""


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor,
    info=LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FeatherLlavaNextForConditionalGeneration(FeatherPruning, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT (v1.6) with the pruned prefill: each image's base view and
    tile map are ranked together, FEATHER's grid is laid on each on its own
    raster, and its newline tokens are kept (pruning/layout.py)."""


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor,
    info=LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class FeatherLlavaOnevisionForConditionalGeneration(FeatherPruning, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision (Qwen2 decoder) with the pruned prefill: images as
    NeXT's (base view, tile map interpolated down above 9 tiles' worth,
    newlines kept). Video tokens are never pruned: a video's frames are
    text to the cut (the plan holds images only)."""
