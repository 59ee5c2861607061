"""The one dispatch point between the model and its hot ops.

The model calls `ops.layer_norm`, `ops.attention`, ... and never a kernel
directly. Each op has a PyTorch reference, `<op>_reference` in
`fastgpt.kernels.reference` (which needs no Triton), and a Triton implementation,
`<op>_triton` in `fastgpt.kernels.<module>`; where Triton does not run (CPUs), PyTorch's
own fused kernel stands in for the two references that are slow there
(`fastgpt.kernels.torch_fused`). `_implementation` below is the only place that chooses.
The choice is plain Python over module-level dicts, so
`torch.compile(model, fullgraph=True)` traces through it without a graph break.

Backends:
  "torch"  - always the PyTorch reference (CPU, debugging, ground truth);
  "triton" - always the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1);
  "auto"   - Triton for CUDA tensors; otherwise PyTorch's fused kernel where one exists
             (attention, bias+GELU), else the reference (the default).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .errors import FastGPTError
from .kernels import reference, torch_fused

BACKENDS = ("auto", "torch", "triton")

# Triton kernels are loaded only where they can run: on a CUDA machine, or on a CPU with
# TRITON_INTERPRET=1 set before fastgpt is imported (the interpreter is chosen when a
# kernel is defined). Elsewhere, and without Triton installed (macOS, a CPU-only
# install), only the references exist. This is the package's one guard against a
# missing Triton.
TRITON_AVAILABLE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
if TRITON_AVAILABLE:
    try:
        from .kernels import attention as _attention
        from .kernels import cross_entropy as _cross_entropy
        from .kernels import decode_attention as _decode_attention
        from .kernels import gelu as _gelu
        from .kernels import layernorm as _layernorm
        from .kernels import linear_cross_entropy as _linear_cross_entropy
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != "triton":
            raise
        TRITON_AVAILABLE = False

# Plain dicts of functions, filled at import: torch.compile traces a lookup in them (an
# import at call time is where Dynamo used to break the graph).
_REFERENCE = {
    "layer_norm": reference.layer_norm_reference,
    "add_layer_norm": reference.add_layer_norm_reference,
    "bias_gelu": reference.bias_gelu_reference,
    "cross_entropy": reference.cross_entropy_reference,
    "linear_cross_entropy": reference.linear_cross_entropy_reference,
    "attention": reference.attention_reference,
    "attention_qkv": reference.attention_qkv_reference,
    "decode_attention": reference.decode_attention_reference,
}
# "auto" off Triton: PyTorch's fused kernels for the ops whose written-out reference is slow
_FUSED_TORCH = {
    "bias_gelu": torch_fused.bias_gelu_fused,
    "attention": torch_fused.attention_fused,
    "attention_qkv": torch_fused.attention_qkv_fused,
    "linear_cross_entropy": torch_fused.linear_cross_entropy_fused,
}
_TRITON = {
    "layer_norm": _layernorm.layer_norm_triton,
    "add_layer_norm": _layernorm.add_layer_norm_triton,
    "bias_gelu": _gelu.bias_gelu_triton,
    "cross_entropy": _cross_entropy.cross_entropy_triton,
    "linear_cross_entropy": _linear_cross_entropy.linear_cross_entropy_triton,
    "attention": _attention.attention_triton,
    "attention_qkv": _attention.attention_qkv_triton,
    "decode_attention": _decode_attention.decode_attention_triton,
} if TRITON_AVAILABLE else {}

_backend = "auto"


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise FastGPTError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
    if name == "triton" and not TRITON_AVAILABLE:
        raise FastGPTError("backend 'triton' needs Triton and a CUDA GPU, or TRITON_INTERPRET=1 set before "
                           "fastgpt is imported (CPU interpreter)")
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


def _implementation(op: str, x: torch.Tensor, triton_supported: bool = True):
    """The one place where the reference and the Triton path part ways. `triton_supported`
    is False for a call the kernel does not cover (attention with dropout)."""
    if triton_supported and uses_triton(x):
        return _TRITON[op]
    if _backend == "auto" and op in _FUSED_TORCH:
        return _FUSED_TORCH[op]
    return _REFERENCE[op]


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return _implementation("layer_norm", x)(x, weight, bias, eps)


def add_layer_norm(residual, x, weight, bias, eps: float = 1e-5):
    """Returns (residual + x, LayerNorm(residual + x))."""
    return _implementation("add_layer_norm", x)(residual, x, weight, bias, eps)


def bias_gelu(x, bias):
    return _implementation("bias_gelu", x)(x, bias)


def check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Every target is in [0, vocab_size) or ignore_index, else a one-line FastGPTError.

    Call it once on the host batch (a CPU tensor: no device sync), before the batch goes
    to the device. The ops do not check: a Triton kernel turns a bad target's loss into
    nan, and a check inside the op would read a value back from the GPU on every call."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if targets.numel() and bool(bad.any()):
        value = int(targets[bad][0])
        raise FastGPTError(f"target {value} is outside the vocabulary [0, {vocab_size}) "
                           f"and is not ignore_index ({ignore_index})")


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    return _implementation("cross_entropy", logits)(logits, targets, ignore_index, reduction)


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                         vocab_size: int | None = None):
    """cross_entropy(hidden @ weight[:vocab_size].T, targets) without keeping the logits when fused.

    `vocab_size`: how many leading rows of `weight` are the vocabulary (None: all); the model's
    head stores more (zero pad rows, for aligned GEMMs), which are never scored."""
    return _implementation("linear_cross_entropy", hidden)(hidden, weight, targets, ignore_index, reduction,
                                                           vocab_size=vocab_size)


def attention(q, k, v, dropout_p: float = 0.0):
    """Causal attention over (B, H, T, D). Attention dropout (training only) does not run on
    the Triton path: the Triton kernel has no in-kernel dropout."""
    if dropout_p > 0.0:
        return _implementation("attention", q, triton_supported=False)(q, k, v, dropout_p)
    return _implementation("attention", q)(q, k, v)


def attention_qkv(qkv, n_head: int, dropout_p: float = 0.0):
    """Causal self-attention of the fused projection qkv (B, T, 3C) -> (B, T, C), heads
    concatenated. The fused kernel's backward writes d qkv as one tensor (no concatenation
    of dQ, dK, dV); attention dropout takes the reference path, as in `attention`."""
    if dropout_p > 0.0:
        return _implementation("attention_qkv", qkv, triton_supported=False)(qkv, n_head, dropout_p)
    return _implementation("attention_qkv", qkv)(qkv, n_head)


def decode_attention(q, k_cache, v_cache, lengths):
    """One query per sequence (B, H, D) against caches (B, H, T_max, D) holding `lengths` entries."""
    return _implementation("decode_attention", q)(q, k_cache, v_cache, lengths)


set_backend(os.environ.get("FASTGPT_BACKEND", "auto"))
