"""FeatherLlavaForConditionalGeneration: vLLM's LLaVA with a pruned prefill.

A request that asks for pruning (SamplingParams.extra_args["feather"], or
the engine-wide default) has its image tokens cut in stages during the step
that prefills its image and last prompt token. At a cut entering layer L the
image tokens still present are scored from layer L-1 (the last prompt
token's query against their keys), the losers' rows are removed from the
hidden states, residual and positions, and the attention metadata of layers
>= L is rebuilt so that their KV cache holds only the survivors, in order,
at compact slots. Later decode steps of that request read and write those
layers' KV in the same compact space; kept tokens keep their original
positions (RoPE) and generated tokens continue from the unpruned length.

A batch in which no request is pruned runs the stock LLaVA forward.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from feather_vllm import records
from feather_vllm.kv import staged
from feather_vllm.kv import step as kv_step
from feather_vllm.pruning import config as pcfg
from feather_vllm.pruning.schedule import decide
from feather_vllm.pruning.scoring import last_token_image_attention
from feather_vllm.pruning.selection import select_stage

logger = logging.getLogger(__name__)

DEFAULT_PRESET_ENV = "FEATHER_DEFAULT_PRESET"


def kv_boundaries(hf_config: Any, num_layers: int) -> list[int]:
    """The KV stage boundaries set for this model (hf_overrides
    `feather_kv_boundaries`), or the presets' cut layers."""
    return pcfg.kv_boundaries(getattr(hf_config, "feather_kv_boundaries", None), num_layers)


@dataclasses.dataclass
class RequestPruning:
    """Worker-side pruning state of one request."""

    config: pcfg.PruningConfig
    image_offset: int = 0
    image_len: int = 0
    # (cut layer, kept image-token indices 0-based within the image, ascending)
    kept: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)
    fallback: str | None = None

    @property
    def active(self) -> bool:
        return self.fallback is None and self.config.enabled

    def kept_at(self, layer: int) -> torch.Tensor | None:
        """Image tokens present in `layer` (None: all of them)."""
        current = None
        for cut, kept in self.kept:
            if cut <= layer:
                current = kept
        return current

    def dropped_positions(self, layer: int) -> torch.Tensor:
        """Absolute positions of the image tokens absent from `layer`, ascending."""
        kept = self.kept_at(layer)
        if kept is None:
            return torch.empty(0, dtype=torch.long)
        mask = torch.ones(self.image_len, dtype=torch.bool)
        mask[kept] = False
        return torch.nonzero(mask).flatten() + self.image_offset

    def summary(self) -> dict[str, Any]:
        return {
            "preset": self.config.name,
            "image_tokens": self.image_len,
            "stages": [{"layer": layer, "kept": kept.tolist()} for layer, kept in self.kept],
            "fallback": self.fallback,
        }


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor,
    info=_build_llava_or_pixtral_hf_info,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class FeatherLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose prefill prunes image tokens in stages (FEATHER, FastV,
    PyramidDrop or explicit stages), with pruned layers' KV compacted."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.num_decoder_layers = config.text_config.num_hidden_layers
        default = getattr(config, "feather_default", None) or os.environ.get(DEFAULT_PRESET_ENV)
        self.default_config = pcfg.resolve(default).validate(self.num_decoder_layers)
        self._states: dict[str, RequestPruning] = {}
        records.clear()  # request ids restart with every engine
        self._tp = get_tensor_model_parallel_world_size()
        self.pruning_unsupported = self._unsupported_reason()
        if self.pruning_unsupported:
            logger.warning("FEATHER pruning disabled: %s", self.pruning_unsupported)
            self.kv_boundaries: list[int] = []
        else:
            self.kv_boundaries = kv_boundaries(config, self.num_decoder_layers)
            if self.kv_boundaries:
                staged.stage_attention_layers(list(self.language_model.model.layers), self.kv_boundaries,
                                              self.num_decoder_layers, default)

    def _unsupported_reason(self) -> str | None:
        if get_pp_group().world_size > 1:
            return "pipeline parallelism is not supported"
        text_model = getattr(self.language_model, "model", None)
        layers = getattr(text_model, "layers", None)
        if layers is None or not all(
            hasattr(layer, "self_attn") and hasattr(layer.self_attn, "qkv_proj")
            and hasattr(layer.self_attn, "rotary_emb") for layer in layers
        ):
            return "the text model is not a Llama-style decoder"
        return None

    # -- per-request state -------------------------------------------------

    def forget_request(self, req_id: str) -> None:
        """Drop a finished/aborted request's state (called by the runner)."""
        self._states.pop(req_id, None)

    def pruning_record(self, req_id: str) -> dict[str, Any] | None:
        """What was kept for a recent request (engine or caller request id)."""
        return records.get(req_id)

    def _record(self, req_id: str, state: RequestPruning) -> None:
        records.put(req_id, state.summary())

    def _resolve(self, spec: Any) -> pcfg.PruningConfig:
        if spec is None:
            return self.default_config
        return pcfg.resolve(spec).validate(self.num_decoder_layers)

    def _plan(self, batch: kv_step.StepBatch) -> list[tuple[RequestPruning | None, bool]]:
        """Per request: its active pruning state and whether it prunes now."""
        plans: list[tuple[RequestPruning | None, bool]] = []
        for req in batch.requests:
            state = self._states.get(req.req_id)
            reaches_image = bool(req.image_ranges) and \
                req.seq_len > min(offset for offset, _ in req.image_ranges)
            # Decide once per (re)started prefill: a preempted request
            # recomputes from zero and decides again.
            if req.num_computed < req.prompt_len and reaches_image and \
                    (state is None or req.num_computed == 0):
                state = self._new_state(req)
            if state is None or not state.active:
                plans.append((None, False))
                continue
            plans.append((state, not state.kept))
        return plans

    def _new_state(self, req: kv_step.RequestSlice) -> RequestPruning | None:
        try:
            config = self._resolve(req.feather)
        except pcfg.PruningConfigError as e:
            state = RequestPruning(pcfg.PRESETS["none"], fallback=f"invalid settings: {e}")
        else:
            if not config.enabled:
                self._states.pop(req.req_id, None)
                return None
            state = RequestPruning(config)
            decision = decide(req.num_computed, req.num_rows, req.prompt_len, req.image_ranges)
            if self.pruning_unsupported:
                state.fallback = self.pruning_unsupported
            elif not decision.prune:
                state.fallback = decision.reason or "nothing to prune"
            else:
                state.image_offset, state.image_len = req.image_ranges[0]
        if state.fallback:
            logger.info("request %s runs unpruned: %s", req.req_id, state.fallback)
            self._record(req.req_id, state)
        self._states[req.req_id] = state
        return state

    # -- forward -----------------------------------------------------------

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        batch = kv_step.current()
        if batch is not None and intermediate_tensors is None:
            plans = self._plan(batch)
            if any(state is not None for state, _ in plans):
                return self._pruned_forward(input_ids, positions, inputs_embeds, batch, plans)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def _pruned_forward(self, input_ids, positions, inputs_embeds, batch, plans):
        lm = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        residual = None
        total_rows = hidden.shape[0]
        rows = torch.arange(total_rows, device=hidden.device)  # original row of each current row
        cuts = sorted({s.layer for state, _ in plans if state is not None for s in state.config.stages})
        fc = get_forward_context()

        for idx in range(lm.start_layer, lm.end_layer):
            layer = lm.layers[idx]
            scorers = [(i, state) for i, (state, now) in enumerate(plans)
                       if now and any(s.layer == idx + 1 for s in state.config.stages)]
            if scorers:
                hidden, residual, scores = self._layer_with_scores(
                    layer, positions, hidden, residual, rows, batch, scorers, idx + 1)
            else:
                hidden, residual = layer(positions, hidden, residual)
            if idx + 1 not in cuts or idx + 1 >= lm.end_layer:
                continue
            if scorers:
                keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
                for i, state in scorers:
                    req = batch.requests[i]
                    stage = next(s for s in state.config.stages if s.layer == idx + 1)
                    before = state.kept_at(idx)
                    if before is None:
                        before = torch.arange(state.image_len)
                    after = select_stage(scores[i], before, stage, state.image_len)
                    state.kept.append((idx + 1, after))
                    dropped = before[~torch.isin(before, after)]
                    dropped_rows = req.row_start + state.image_offset + dropped - req.num_computed
                    keep &= ~torch.isin(rows, dropped_rows.to(rows.device))
                hidden, residual = hidden[keep], residual[keep]
                positions, rows = positions[keep], rows[keep]
            next_cut = next((c for c in cuts if c > idx + 1), lm.end_layer)
            self._retarget_attention(fc, lm, batch, plans, rows, positions, idx + 1, next_cut)

        for req, (state, now) in zip(batch.requests, plans):
            if now and state is not None:
                self._record(req.req_id, state)

        hidden, _ = lm.norm(hidden, residual)
        if rows.shape[0] == total_rows:
            return hidden
        # Logits are read at full-row indices: put survivors back in place.
        out = hidden.new_zeros((total_rows, hidden.shape[1]))
        out[rows] = hidden
        return out

    def _layer_with_scores(self, layer, positions, hidden, residual, rows, batch, scorers, cut):
        """A Llama decoder layer's forward that also scores image tokens
        for the requests cutting at `cut` (mirrors LlamaDecoderLayer.forward)."""
        if residual is None:
            residual = hidden
            x = layer.input_layernorm(hidden)
        else:
            x, residual = layer.input_layernorm(hidden, residual)
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)

        picks = {}
        for i, state in scorers:
            req = batch.requests[i]
            present = state.kept_at(cut - 1)
            if present is None:
                present = torch.arange(state.image_len)
            image_rows = req.row_start + state.image_offset + present - req.num_computed
            last_row = torch.tensor([req.row_start + req.prompt_len - 1 - req.num_computed])
            picks[i] = (torch.searchsorted(rows, last_row.to(rows.device)),
                        torch.searchsorted(rows, image_rows.to(rows.device)))
        raw = {i: (q[last], k[img]) for i, (last, img) in picks.items()}  # gathers copy
        q, k = attn.rotary_emb(positions, q, k)
        roped = {i: (q[last], k[img]) for i, (last, img) in picks.items()}

        scores = {}
        head_dim = attn.head_dim
        for i, state in scorers:
            stage = next(s for s in state.config.stages if s.layer == cut)
            q_last, k_img = (roped if stage.criterion == "rope" else raw)[i]
            s = last_token_image_attention(
                q_last.reshape(-1, head_dim), k_img.reshape(k_img.shape[0], -1, head_dim), attn.scaling)
            if self._tp > 1:
                # Each rank holds a slice of the heads: average over all heads.
                local_heads = q_last.numel() // head_dim
                s = tensor_model_parallel_all_reduce(s * local_heads) / (local_heads * self._tp)
            scores[i] = s.cpu()

        out = attn.attn(q, k, v)
        out, _ = attn.o_proj(out)
        hidden, residual = layer.post_attention_layernorm(out, residual)
        hidden = layer.mlp(hidden)
        return hidden, residual, scores

    def _retarget_attention(self, fc, lm, batch, plans, rows, positions, start, stop):
        """Point layers [start, stop) at metadata and slots for the rows
        (and compact KV) that these layers keep."""
        rows_cpu = rows.cpu()
        pos_cpu = positions.cpu()
        bounds = torch.tensor([r.row_start for r in batch.requests] +
                              [batch.requests[-1].row_start + batch.requests[-1].num_rows])
        edges = torch.searchsorted(rows_cpu, bounds)
        counts = edges[1:] - edges[:-1]
        qsl = torch.zeros(len(batch.requests) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(counts, 0)
        dropped = [state.dropped_positions(start) if state is not None else None
                   for state, _ in plans]
        seq_lens = torch.tensor(
            [r.seq_len - (0 if d is None else d.numel()) for r, d in zip(batch.requests, dropped)],
            dtype=torch.int32)

        names = [lm.layers[i].self_attn.attn.layer_name for i in range(start, stop)]
        built: dict[int, tuple[Any, torch.Tensor]] = {}
        for name in names:
            g = batch.layer_group[name]
            if g not in built:
                view = batch.groups[g]
                slots = fc.slot_mapping[name][rows].clone()
                block_table = view.common.block_table_tensor
                for i, d in enumerate(dropped):
                    if d is None or d.numel() == 0:
                        continue
                    lo, hi = int(edges[i]), int(edges[i + 1])
                    pos = pos_cpu[lo:hi].long()
                    compact = pos - torch.searchsorted(d, pos)
                    blocks = block_table[i].cpu().long()[compact // view.block_size]
                    slots[lo:hi] = (blocks * view.block_size + compact % view.block_size).to(slots.device)
                md = batch.rebuild_metadata(g, qsl, seq_lens, slots, positions, rows.shape[0])
                built[g] = (md, slots)
            fc.attn_metadata[name], fc.slot_mapping[name] = built[g]
