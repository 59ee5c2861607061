"""The one dispatch point between the model and its hot ops.

The model calls `ops.layer_norm`, `ops.attention`, ... and never a kernel
directly. Each op has a PyTorch reference and a Triton implementation living
side by side in `fastgpt.kernels.<module>`, named `<op>_reference` and
`<op>_triton`; `_implementation` below is the only place that chooses.

Backends:
  "torch"  - always the PyTorch reference (CPU, debugging, ground truth);
  "triton" - always the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1);
  "auto"   - Triton for CUDA tensors, the reference otherwise (the default).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from .errors import FastGPTError

BACKENDS = ("auto", "torch", "triton")

# op name -> module under fastgpt.kernels that implements it
_OP_MODULES = {
    "layer_norm": "layernorm",
    "add_layer_norm": "layernorm",
    "bias_gelu": "gelu",
    "cross_entropy": "cross_entropy",
    "linear_cross_entropy": "linear_cross_entropy",
    "attention": "attention",
    "decode_attention": "decode_attention",
}

_backend = os.environ.get("FASTGPT_BACKEND", "auto")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise FastGPTError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily switch backend: `with ops.use_backend("triton"): model(x)`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def uses_triton(x: torch.Tensor) -> bool:
    """Whether an op on `x` runs a Triton kernel under the current backend."""
    return _backend == "triton" or (_backend == "auto" and x.is_cuda)


@functools.lru_cache(maxsize=None)
def _lookup(op: str, kind: str):
    module = importlib.import_module(f"fastgpt.kernels.{_OP_MODULES[op]}")
    return getattr(module, f"{op}_{kind}")


def _implementation(op: str, x: torch.Tensor):
    """The one place where the reference and the Triton path part ways."""
    return _lookup(op, "triton" if uses_triton(x) else "reference")


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return _implementation("layer_norm", x)(x, weight, bias, eps)


def add_layer_norm(residual, x, weight, bias, eps: float = 1e-5):
    """Returns (residual + x, LayerNorm(residual + x))."""
    return _implementation("add_layer_norm", x)(residual, x, weight, bias, eps)


def bias_gelu(x, bias):
    return _implementation("bias_gelu", x)(x, bias)


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    return _implementation("cross_entropy", logits)(logits, targets, ignore_index, reduction)


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100, reduction: str = "mean"):
    """cross_entropy(hidden @ weight.T, targets) without keeping the logits when fused."""
    return _implementation("linear_cross_entropy", hidden)(hidden, weight, targets, ignore_index, reduction)


def attention(q, k, v, dropout_p: float = 0.0):
    """Causal attention over (B, H, T, D). Attention dropout (training only) runs on the
    reference path: the Triton kernel has no in-kernel dropout."""
    if dropout_p > 0.0:
        from .kernels.attention import attention_reference
        return attention_reference(q, k, v, dropout_p)
    return _implementation("attention", q)(q, k, v)


def decode_attention(q, k_cache, v_cache, lengths):
    """One query per sequence (B, H, D) against caches (B, H, T_max, D) holding `lengths` entries."""
    return _implementation("decode_attention", q)(q, k_cache, v_cache, lengths)
