"""Bias add + GELU (tanh approximation), the MLP's activation in GPT-2."""
from __future__ import annotations

import math

import torch

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), u = x + bias."""
    u = x + bias
    return 0.5 * u * (1.0 + torch.tanh(SQRT_2_OVER_PI * (u + 0.044715 * u * u * u)))
