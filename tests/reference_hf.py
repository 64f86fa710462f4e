"""Independent reference for pruned generation on transformers' LLaVA.

Used by tests only. It shares the method (scoring.py / selection.py) with
the engine but none of the vLLM path: an explicit loop over the Hugging
Face decoder layers of one sequence, each layer given only the tokens it
keeps (with their original position ids and an explicit causal mask), and
decoding by recomputing that pruned forward for every new token with the
kept sets frozen at the prompt — so a generated token can only ever see,
in each layer, the tokens that layer keeps.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from feather_vllm.pruning.config import PruningConfig
from feather_vllm.pruning.scoring import last_token_image_attention
from feather_vllm.pruning.selection import select_stage


def _embed(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    features = inner.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True,
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


@torch.no_grad()
def _forward(model, embeds: torch.Tensor, image_start: int, num_image: int, prompt_len: int,
             config: PruningConfig, kept: dict[int, torch.Tensor] | None):
    """Pruned forward of one sequence. With `kept` None the stages are
    decided here (prompt pass); otherwise the given kept sets are applied.
    Returns (last-position logits, kept sets per cut layer)."""
    lm = model.model.language_model
    seq_len = embeds.shape[1]
    decide = kept is None
    kept = {} if decide else kept
    present = torch.arange(num_image)  # image tokens (0-based in the image) still present
    rows = torch.arange(seq_len)  # original positions of the tokens present
    hidden = embeds
    stages = {s.layer: s for s in config.stages}
    for index, layer in enumerate(lm.layers):
        if index in stages:
            before, present = present, kept[index]
            keep = ~torch.isin(rows, before[~torch.isin(before, present)] + image_start)
            hidden, rows = hidden[:, keep], rows[keep]
        position_ids = rows.unsqueeze(0)
        cos, sin = lm.rotary_emb(hidden, position_ids=position_ids)
        n = rows.numel()
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        if decide and index + 1 in stages:
            image_rows = torch.searchsorted(rows, present + image_start)
            last = int(torch.searchsorted(rows, torch.tensor(prompt_len - 1)))
            stage = stages[index + 1]
            scores = _score(layer, hidden, cos, sin, last, image_rows, stage.criterion == "rope")
            kept[index + 1] = select_stage(scores, present, stage, num_image)
        out = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))
        hidden = out[0] if isinstance(out, tuple) else out
    hidden = lm.norm(hidden)
    logits = model.lm_head(hidden[:, -1])
    return logits[0].float(), kept


@torch.no_grad()
def reference_generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                       config: PruningConfig, max_new_tokens: int) -> dict:
    """Greedy pruned generation: token ids, their logprobs, kept sets."""
    ids = input_ids[0]
    image_positions = torch.nonzero(ids == model.config.image_token_index).flatten()
    image_start, num_image = int(image_positions[0]), image_positions.numel()
    prompt_len = ids.numel()
    embeds = _embed(model, input_ids, pixel_values)
    tokens: list[int] = []
    logprobs: list[float] = []
    kept = None
    for _ in range(max_new_tokens):
        logits, kept = _forward(model, embeds, image_start, num_image, prompt_len, config, kept)
        token = int(torch.argmax(logits))
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        new = model.model.get_input_embeddings()(torch.tensor([[token]]))
        embeds = torch.cat([embeds, new], dim=1)
    return {"token_ids": tokens, "logprobs": logprobs,
            "kept": [kept[s.layer].tolist() for s in config.stages]}
