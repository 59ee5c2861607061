"""LayerNorm, and LayerNorm fused with the residual add that precedes it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_reference(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, LayerNorm(residual + x)): the pre-LN block's add, then its next norm."""
    new_residual = residual + x
    return new_residual, layer_norm_reference(new_residual, weight, bias, eps)
