"""The pruning criterion: the last prompt token's attention to image keys."""

from __future__ import annotations

import torch


def last_token_image_attention(q_last: torch.Tensor, k_image: torch.Tensor, scale: float) -> torch.Tensor:
    """Score each image token by the attention the last prompt token pays it.

    q_last: [num_heads, head_dim], k_image: [n_img, num_kv_heads, head_dim].
    Softmax over the image keys only, mean over query heads; with grouped-
    query attention query head h reads KV head h // (num_heads // num_kv_heads).
    Whether RoPE was applied to q/k is the caller's choice (the criterion).
    Returns float32 [n_img].
    """
    num_heads, head_dim = q_last.shape
    num_kv_heads = k_image.shape[1]
    keys = k_image.float().repeat_interleave(num_heads // num_kv_heads, dim=1)  # [n, H, d]
    logits = torch.einsum("hd,nhd->hn", q_last.float(), keys) * scale
    return torch.softmax(logits, dim=-1).mean(dim=0)
