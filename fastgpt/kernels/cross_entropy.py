"""Cross-entropy of logits against integer targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            reduction: str = "mean") -> torch.Tensor:
    """Mean (over non-ignored rows) or summed negative log-likelihood, computed in fp32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)
