"""Causal multi-head attention: softmax(Q K^T / sqrt(d) + causal mask) V."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v: (B, H, T, D) -> (B, H, T, D). Written out step by step, as the textbooks do.

    Query i may attend to keys 0..i only (the causal mask), so a token never sees
    the future it is trained to predict.
    """
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v
