"""The PyTorch reference of every hot op, in one module that never imports Triton.

These are the ground truth the kernels are tested against and the path a machine
without Triton (macOS, a CPU-only Linux install) runs. Each kernel module re-exports
its own references, so `fastgpt.kernels.gelu.bias_gelu_reference` still names the
function here; `fastgpt.ops` imports this module alone for its reference path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import FastGPTError

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_reference(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, LayerNorm(residual + x)): the pre-LN block's add, then its next norm."""
    new_residual = residual + x
    return new_residual, layer_norm_reference(new_residual, weight, bias, eps)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), u = x + bias."""
    u = x + bias
    return 0.5 * u * (1.0 + torch.tanh(SQRT_2_OVER_PI * (u + GELU_CUBIC * u * u * u)))


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            reduction: str = "mean") -> torch.Tensor:
    """Mean (over non-ignored rows) or summed negative log-likelihood, computed in fp32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean",
                                   vocab_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight[:vocab_size].T, targets); hidden (N, C), weight (>= vocab_size, C),
    targets (N,). Rows past `vocab_size` (a padded head's) are no token (None: every row is one)."""
    check_vocab_size(vocab_size, weight.shape[0])
    if vocab_size is not None:
        weight = weight[:vocab_size]
    return cross_entropy_reference(hidden @ weight.t(), targets, ignore_index, reduction)


def check_vocab_size(vocab_size: int | None, rows: int) -> None:
    """vocab_size is None or an int in [1, rows], else a one-line FastGPTError."""
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)
                                   or not 1 <= vocab_size <= rows):
        raise FastGPTError(f"linear_cross_entropy: vocab_size must be an integer in [1, {rows}] "
                           f"(the weight's rows), got {vocab_size!r}")


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


def attention_qkv_reference(qkv: torch.Tensor, n_head: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal self-attention of a fused projection: qkv (B, T, 3C) -> (B, T, C), heads concatenated."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    return attention_reference(q, k, v, dropout_p).transpose(1, 2).reshape(B, T, C)


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
