"""Attention of one new query per sequence against its KV cache (the decode step)."""
from __future__ import annotations

import math

import torch


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor) -> torch.Tensor:
    """q: (B, H, D); caches: (B, H, T_max, D); lengths: (B,) valid cache entries per sequence
    (the new token's own key included). Returns (B, H, D).

    Sequences of a batch may hold different numbers of tokens: entries at or past
    `lengths[b]` are masked out.
    """
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k_cache.float()) / math.sqrt(q.shape[-1])
    positions = torch.arange(k_cache.shape[2], device=q.device)
    scores = scores.masked_fill(positions[None, None, :] >= lengths[:, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bht,bhtd->bhd", weights, v_cache.float()).to(q.dtype)
