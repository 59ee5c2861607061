"""The LM head projection and cross-entropy as one op.

The logits tensor (rows x vocab) is the largest activation of GPT-2; computing
the loss from the hidden states directly lets a fused kernel avoid storing it.
"""
from __future__ import annotations

import torch

from .cross_entropy import cross_entropy_reference


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets); hidden (N, C), weight (V, C), targets (N,)."""
    return cross_entropy_reference(hidden @ weight.t(), targets, ignore_index, reduction)
