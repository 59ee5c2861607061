"""PyTorch's own fused kernels: the fast path where no Triton kernel runs (CPUs).

The references in `reference.py` write each op out step by step, which is what a reader
and the tests want, but on a CPU two of them are slow: the tanh-GELU formula makes nine
passes over a (B, T, 4C) tensor forward and more backward, and causal attention builds the
(T, T) score matrix, a mask and a softmax in every layer. Measured per layer, forward +
backward, GPT-2 124M at B=4, T=256 on a 2-core EPYC: GELU 1601 -> 284 ms with `F.gelu`,
attention 1036 -> 655 ms with `F.scaled_dot_product_attention` (its CPU flash kernel)
(benchmarks/results/2026-11-29-cpu-train/). Same mathematics, rounding aside.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_gelu_fused(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias) through PyTorch's vectorised kernel."""
    return F.gelu(x + bias, approximate="tanh")


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention (B, H, T, D) through scaled_dot_product_attention (flash on CPU)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


def attention_qkv_fused(qkv: torch.Tensor, n_head: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal self-attention of a fused projection: qkv (B, T, 3C) -> (B, T, C)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    return attention_fused(q, k, v, dropout_p).transpose(1, 2).reshape(B, T, C)
