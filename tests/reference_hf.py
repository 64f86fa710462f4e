"""Independent reference for pruned generation on transformers' LLaVA
(LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision, whose Qwen2 layers take the
same calls as Llama's).

Used by tests only. It shares the method (scoring.py / selection.py) with
the engine but none of the vLLM path: an explicit loop over the Hugging
Face decoder layers of one sequence, each layer given only the tokens it
keeps, with their original position ids and an explicit causal mask.

The prompt pass decides the kept sets: for a cut at layer L the criterion
is computed inside layer L-1 (q/k projections of input_layernorm of the
hidden state entering L-1, with or without RoPE at the original positions),
and the dropped image tokens are removed before layer L runs. Text tokens
are never dropped. An anyres (NeXT, OneVision) image's tokens follow its layout
(pruning/layout.py: base view, tile map, newline tokens); the reference
checks the layout's newline positions against where transformers put its
`image_newline` embedding. Decoding is greedy and continues at position ids
prompt_len, prompt_len + 1, ... Two decode modes give the same result:

- "cache" (default): each layer keeps its own KV cache of exactly the tokens
  that layer processed in the prompt pass, plus the generated ones;
- "recompute": the whole pruned forward is recomputed for every new token
  with the kept sets frozen at the prompt (slow, but needs no cache at all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from feather_vllm.pruning.config import PruningConfig
from feather_vllm.pruning.layout import ImageLayout, LayoutRule, select_stage_layout
from feather_vllm.pruning.scoring import last_token_image_attention
from feather_vllm.pruning.selection import grid_side


class _PerLayerKV:
    """The minimal cache interface HF attention calls (`update`): one
    independent (keys, values) pair per layer, so each layer holds only the
    tokens it was given."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.kv:
            old_k, old_v = self.kv[layer_idx]
            keys, values = torch.cat([old_k, keys], dim=-2), torch.cat([old_v, values], dim=-2)
        self.kv[layer_idx] = (keys, values)
        return keys, values

    def tokens(self, layer_idx: int) -> int:
        return self.kv[layer_idx][0].shape[-2]


def _embed(model, input_ids: torch.Tensor, pixel_values: torch.Tensor,
           image_sizes: torch.Tensor | None) -> torch.Tensor:
    """Text embeddings with the projected image features scattered in
    (NeXT: packed by transformers, newline tokens included)."""
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    extra = {} if image_sizes is None else {"image_sizes": image_sizes}
    features = inner.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True, **extra,
    ).pooler_output
    features = torch.cat(list(features), dim=0).to(embeds.dtype)
    mask = (input_ids == model.config.image_token_index).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, features)


def _score(layer, hidden: torch.Tensor, cos, sin, last: int, image_rows: torch.Tensor, rope: bool) -> torch.Tensor:
    """The criterion inside `layer` (the layer before a cut) for one sequence."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(1, -1, attn.config.num_attention_heads, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, -1, attn.config.num_key_value_heads, head_dim).transpose(1, 2)
    if rope:
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q_last = q[0, :, last]  # [heads, d]
    k_img = k[0, :, image_rows].transpose(0, 1)  # [n, kv_heads, d]
    return last_token_image_attention(q_last, k_img, attn.scaling)


def _layer_inputs(lm, hidden: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, Any, Any, torch.Tensor]:
    """A layer's position ids (each row's original position: RoPE as if
    unpruned), RoPE's cos and sin, and the causal mask over the rows in
    their order."""
    position_ids = rows.unsqueeze(0)
    cos, sin = lm.rotary_emb(hidden, position_ids=position_ids)
    n = rows.numel()
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype).triu(1)[None, None]
    return position_ids, cos, sin, mask


@torch.no_grad()
def _forward(model, embeds: torch.Tensor, images: list[tuple[int, ImageLayout]], prompt_len: int,
             config: PruningConfig, kept: dict[int, list[torch.Tensor]] | None, cache: _PerLayerKV | None = None,
             also: dict[int, list[torch.Tensor]] | None = None):
    """Pruned forward of one sequence from position 0. `images` are the
    (start, layout) of each image's tokens. With `kept` None the stages are
    decided here (prompt pass), each image on its own (its own scores, top
    fraction and grid), each stage keeping `also` (per cut layer, per image)
    on top; otherwise the given kept sets (per cut layer, per image) are
    applied. Returns (last-position logits, kept sets, tokens present in
    each layer)."""
    lm = model.model.language_model
    seq_len = embeds.shape[1]
    decide = kept is None
    kept = {} if decide else kept
    present = [torch.arange(layout.num_tokens) for _, layout in images]  # per image: tokens still present
    rows = torch.arange(seq_len)  # original positions of the tokens present
    hidden = embeds
    stages = {s.layer: s for s in config.stages}
    layer_tokens = []
    for index, layer in enumerate(lm.layers):
        if index in stages:
            dropped = torch.cat([before[~torch.isin(before, after)] + start
                                 for (start, _), before, after in zip(images, present, kept[index])])
            present = kept[index]
            keep = ~torch.isin(rows, dropped)
            hidden, rows = hidden[:, keep], rows[keep]
        layer_tokens.append(rows.numel())
        # Rows are ascending original positions, so "causal" on the compacted
        # sequence is causal on the original one.
        position_ids, cos, sin, mask = _layer_inputs(lm, hidden, rows)
        if decide and index + 1 in stages:
            last = int(torch.searchsorted(rows, torch.tensor(prompt_len - 1)))
            stage = stages[index + 1]
            kept[index + 1] = []
            for i, ((start, layout), image_present) in enumerate(zip(images, present)):
                # All the image's present tokens, newlines included, share one softmax.
                image_rows = torch.searchsorted(rows, image_present + start)
                scores = _score(layer, hidden, cos, sin, last, image_rows, stage.criterion == "rope")
                selected = select_stage_layout(scores, image_present, stage, layout)
                if also is not None:
                    selected = torch.unique(torch.cat([selected, also[index + 1][i]]))
                kept[index + 1].append(selected)
        out = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=cache is not None, position_embeddings=(cos, sin))
        hidden = out[0] if isinstance(out, tuple) else out
    hidden = lm.norm(hidden)
    logits = model.lm_head(hidden[:, -1])
    return logits[0].float(), kept, layer_tokens


@torch.no_grad()
def _decode_step(model, token: int, position: int, cache: _PerLayerKV) -> torch.Tensor:
    """One generated token through every layer against that layer's cache."""
    lm = model.model.language_model
    hidden = model.model.get_input_embeddings()(torch.tensor([[token]]))
    position_ids = torch.tensor([[position]])
    cos, sin = lm.rotary_emb(hidden, position_ids=position_ids)
    for layer in lm.layers:
        # A single query may attend to every cached token: no mask needed.
        out = layer(hidden, attention_mask=None, position_ids=position_ids, past_key_values=cache,
                    use_cache=True, position_embeddings=(cos, sin))
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(hidden)[:, -1])[0].float()


def _image_spans(model, input_ids: torch.Tensor, num_images: int, config: PruningConfig,
                 image_sizes: torch.Tensor | None) -> list[tuple[int, ImageLayout]]:
    """(start, layout) of each image's token run, in order: LLaVA-1.5's
    `num_images` runs of equal length, NeXT's of the lengths their layouts
    (from `image_sizes`) give; refuses what the method does not cover when
    pruning is asked for."""
    ids = input_ids[0]
    positions = torch.nonzero(ids == model.config.image_token_index).flatten()
    rule = LayoutRule.of(model.config)
    if rule.needs_image_size:
        layouts = [rule.layout(tuple(size.tolist())) for size in image_sizes]
    else:
        if positions.numel() == 0 or positions.numel() % num_images:
            raise ValueError(f"{positions.numel()} image tokens for {num_images} images")
        count = positions.numel() // num_images
        if config.enabled:
            grid_side(count)  # NonSquareGridError: out of the method's scope
        side = math.isqrt(count)  # unpruned, any count runs (one row then)
        layouts = [ImageLayout.square(side) if side * side == count
                   else ImageLayout.from_rasters(("image", 1, count, False))] * num_images
    if sum(layout.num_tokens for layout in layouts) != positions.numel():
        raise ValueError(f"{positions.numel()} image tokens for images of {[l.num_tokens for l in layouts]}")
    spans, at = [], 0
    for layout in layouts:
        start = int(positions[at])
        if not torch.equal(positions[at:at + layout.num_tokens], torch.arange(start, start + layout.num_tokens)):
            raise ValueError("each image's tokens must form one contiguous run")
        spans.append((start, layout))
        at += layout.num_tokens
    if config.enabled:
        if spans[-1][0] + spans[-1][1].num_tokens >= ids.numel():
            raise ValueError("no text after the last image: the last prompt token would be an image token")
        config.validate(len(model.model.language_model.layers))
    return spans


def _check_newlines(model, embeds: torch.Tensor, images: list[tuple[int, ImageLayout]]) -> None:
    """The layout's newline tokens are exactly where transformers put its
    `image_newline` embedding (an independent check of the layout)."""
    newline = getattr(model.model, "image_newline", None)
    for start, layout in images:
        run = embeds[0, start:start + layout.num_tokens]
        found = (run == newline.to(run.dtype)).all(-1) if newline is not None else torch.zeros(len(run), dtype=bool)
        if not torch.equal(found, layout.newline_mask()):
            raise AssertionError(f"newline tokens of the layout {layout.newline_indices().tolist()} are not "
                                 f"transformers' {torch.nonzero(found).flatten().tolist()}")


def kept_lists(stages: Sequence[Any]) -> list[list[list[int]]]:
    """The kept sets of an engine report's stages (`StageKept`), per stage
    and image, in the shape the reference takes (`kept`, `also`) and
    returns (`kept`)."""
    return [[list(k) for k in stage.per_image] for stage in stages]


def _by_layer(config: PruningConfig, sets: list[list[list[int]]] | None) -> dict[int, list[torch.Tensor]] | None:
    """Kept sets given per stage and image, keyed by cut layer."""
    return None if sets is None else {stage.layer: [torch.tensor(k, dtype=torch.long) for k in per_image]
                                      for stage, per_image in zip(config.stages, sets)}


@torch.no_grad()
def reference_generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, config: PruningConfig,
                       max_new_tokens: int, decode: Literal["cache", "recompute"] = "cache",
                       kept: list[list[list[int]]] | None = None, image_sizes: torch.Tensor | None = None,
                       also: list[list[list[int]]] | None = None) -> dict:
    """Greedy pruned generation of one prompt (batch of 1).

    `kept` (per stage, per image, as returned) forces the kept sets instead
    of deciding them: a later turn that reuses an earlier turn's selection.
    `also` (the same shape) is kept at each stage on top of the stage's own
    selection: a later turn that keeps both.

    `pixel_values` holds one image per image-token run of the prompt (NeXT:
    its tiles, with `image_sizes` as the processor gives them).
    Returns token_ids, logprobs (float32 log_softmax of each chosen token),
    kept (per stage, per image: surviving image indices, 0-based within
    the image, ascending) and layer_tokens (tokens each decoder layer
    processed in the prompt pass). Load the model in float32 for exact
    comparisons.
    """
    images = _image_spans(model, input_ids, pixel_values.shape[0], config, image_sizes)
    prompt_len = input_ids.shape[1]
    embeds = _embed(model, input_ids, pixel_values, image_sizes)
    _check_newlines(model, embeds, images)
    cache = _PerLayerKV() if decode == "cache" else None
    logits, kept, layer_tokens = _forward(model, embeds, images, prompt_len, config, _by_layer(config, kept), cache,
                                          _by_layer(config, also))
    tokens: list[int] = []
    logprobs: list[float] = []
    for step in range(max_new_tokens):
        if step:
            if cache is not None:
                logits = _decode_step(model, tokens[-1], prompt_len + step - 1, cache)
            else:
                new = model.model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))
                embeds = torch.cat([embeds, new], dim=1)
                logits, _, _ = _forward(model, embeds, images, prompt_len, config, kept)
        token = int(torch.argmax(logits))
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
    return {"token_ids": tokens, "logprobs": logprobs,
            "kept": [[k.tolist() for k in kept[s.layer]] for s in config.stages], "layer_tokens": layer_tokens}


@torch.no_grad()
def reference_add_back(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, config: PruningConfig,
                       max_new_tokens: int, kept: list[list[list[int]]], history_end: int, add: int) -> dict:
    """Greedy generation of a follow-up turn that reuses an earlier turn's
    pruned KV and adds back image tokens for its own question
    (follow_up "add_back", docs/multi_turn_reuse.md). LLaVA-1.5 layouts.

    `kept`: the earlier turn's kept sets (per stage, per image); the prompt
    before `history_end` is that turn's (its KV as it computed it).
    Layers before the first cut run the whole sequence. In the layer before
    it, the last prompt token's criterion ranks each image's tokens the
    earlier turn dropped there (softmax over them): each image's top `add`
    (A) are added back. From the first cut on the sequence is [prefix, the
    earlier kept image tokens, history, A, the rest of the prompt], in that
    order, causal, at original positions; later cuts keep their earlier
    kept set and A. Returns token_ids, kept (per stage and image: earlier
    kept set and A) and added (per image, A, ascending)."""
    images = _image_spans(model, input_ids, pixel_values.shape[0], config, None)
    prompt_len = input_ids.shape[1]
    lm = model.model.language_model
    hidden = _embed(model, input_ids, pixel_values, None)
    rows = torch.arange(prompt_len)
    # Per cut: its stage and the earlier turn's kept rows (absolute positions).
    stages = {s.layer: (s, torch.cat([torch.tensor(k, dtype=torch.long) + start
                                      for k, (start, _) in zip(per_image, images)]))
              for s, per_image in zip(config.stages, kept)}
    first = config.stages[0].layer
    is_image = torch.zeros(prompt_len, dtype=torch.bool)
    for start, layout in images:
        is_image[start:start + layout.num_tokens] = True
    added = [torch.empty(0, dtype=torch.long) for _ in images]  # per image, 0-based
    added_rows = torch.empty(0, dtype=torch.long)
    cache = _PerLayerKV()
    for index, layer in enumerate(lm.layers):
        if index in stages:
            keep = ~is_image[rows] | torch.isin(rows, torch.cat([stages[index][1], added_rows]))
            if index == first:  # reorder: A after the history
                order = torch.cat([rows[keep & (rows < history_end) & ~torch.isin(rows, added_rows)],
                                   added_rows, rows[keep & (rows >= history_end)]])
                hidden, rows = hidden[:, order], order  # rows were all of them, in order
            else:
                hidden, rows = hidden[:, keep], rows[keep]
        position_ids, cos, sin, mask = _layer_inputs(lm, hidden, rows)
        if index + 1 == first:
            stage = stages[first][0]
            for i, ((start, layout), earlier) in enumerate(zip(images, kept[0])):
                dropped = torch.tensor(sorted(set(range(layout.num_tokens)) - set(earlier)), dtype=torch.long)
                scores = _score(layer, hidden, cos, sin, prompt_len - 1, dropped + start, stage.criterion == "rope")
                order = torch.sort(scores.float(), descending=True, stable=True).indices
                added[i] = torch.sort(dropped[order[:add]]).values
            added_rows = torch.cat([a + start for a, (start, _) in zip(added, images)])
        out = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True, position_embeddings=(cos, sin))
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(lm.norm(hidden)[:, -1])[0].float()
    tokens: list[int] = []
    for step in range(max_new_tokens):
        if step:
            logits = _decode_step(model, tokens[-1], prompt_len + step - 1, cache)
        tokens.append(int(torch.argmax(logits)))
    return {"token_ids": tokens, "added": [a.tolist() for a in added],
            "kept": [[sorted(set(k) | set(a.tolist())) for k, a in zip(per_image, added)] for per_image in kept]}
