"""Weight-only int8 and int4 quantization, for fast decoding on CPUs.

Decoding one sequence reads every weight once per token, so its speed is set by
memory bandwidth / bytes of weights. Two formats, both converted on the fly
inside ATen's CPU matmuls (bf16 activations):

  int8: each matrix row as int8 plus one scale per row (symmetric, absmax / 127):
        4x fewer bytes than float32 (`_weight_int8pack_mm`).
  int4: each run of `group_size` weights along a row as 4-bit codes q in 0..15
        with its own scale and offset, w ~ (q - 8) * scale + zero (asymmetric,
        min/max of the group): ~6.4x fewer bytes than float32 at group size 32 (4 bytes of scale and zero per group)
        (`_weight_int4pack_mm_for_cpu`).

Both are approximations: each weight moves by up to half a quantization step
(int8: absmax / 254 of its row; int4: (max - min) / 30 of its group, 8x coarser
or worse), so logits change and greedy text can differ from the float model's.
Inference only: the quantized layers hold no gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FastGPTError


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one scale per output row: y = (x @ q.T) * scale + bias."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(dtype))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (the model fuses fc's bias into its GELU)."""
        rows = x.reshape(-1, self.in_features)
        if rows.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scale.to(rows.dtype))
        else:  # other devices: dequantize (correct, not fast)
            y = F.linear(rows, self.qweight.to(rows.dtype) * self.scale.to(rows.dtype)[:, None])
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul_no_bias(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


class Int4Linear(nn.Module):
    """nn.Linear with 4-bit weights in groups of `group_size` along each row, each group
    with its own bf16 scale and zero: w = (q - 8) * scale + zero, q in 0..15.

    The codes are stored in ATen's packed CPU layout (two codes per byte); the
    output dimension is padded to a multiple of 16 (the layout's tile) and the
    padding sliced off the result.
    """

    def __init__(self, linear: nn.Linear, group_size: int = 32, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        N, K = linear.out_features, linear.in_features
        if linear.weight.device.type != "cpu":
            raise FastGPTError(f"int4 quantization runs on CPU only (ATen's int4 CPU matmul); the weights are on "
                               f"{linear.weight.device}")
        if group_size not in (32, 64, 128, 256) or K % group_size:
            raise FastGPTError(f"int4 group_size must be 32, 64, 128 or 256 and divide in_features={K}, "
                               f"got {group_size}")
        padded = -N % 16
        weight = F.pad(linear.weight.detach().float(), (0, 0, 0, padded))
        codes, scale, zero = quantize_groups_int4(weight, group_size)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # (K / group_size, N, 2): the layout the matmul reads, scale and zero of each group
        self.register_buffer("scale_zero", torch.stack([scale.T, zero.T], dim=-1).to(dtype).contiguous())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features, self.group_size = K, N, group_size

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (the model fuses fc's bias into its GELU)."""
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != self.scale_zero.dtype:  # the kernel wants activations in the scales' dtype
            rows = rows.to(self.scale_zero.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.packed, self.group_size,
                                                       self.scale_zero)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul_no_bias(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) float32 weight this layer multiplies by, unpacked by the matmul
        itself: the identity times W.T is W.T."""
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero)
        return w_t[:, :self.out_features].T.float()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 weights, group_size={self.group_size}")


def quantize_groups_int4(weight: torch.Tensor, group_size: int):
    """(N, K) float -> codes (N, K) int32 in 0..15, scale and zero (N, K / group_size) float32,
    so that weight ~ (codes - 8) * scale + zero, each group spanning its own [min, max]."""
    N, K = weight.shape
    groups = weight.reshape(N, K // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = low + 8 * scale
    return codes.to(torch.int32).reshape(N, K), scale, zero


QUANTIZATIONS = ("int8", "int4")


def quantize(model, mode: str, dtype: torch.dtype = torch.bfloat16, group_size: int = 32):
    """Quantize `model` in place: mode "int8" (quantize_int8) or "int4" (quantize_int4)."""
    if mode == "int8":
        return quantize_int8(model, dtype)
    if mode == "int4":
        return quantize_int4(model, dtype, group_size)
    raise FastGPTError(f"unknown quantization {mode!r} (choose from: {', '.join(QUANTIZATIONS)})")


def quantize_int4(model, dtype: torch.dtype = torch.bfloat16, group_size: int = 32, head: str = "int4"):
    """Like quantize_int8, but the matrices become Int4Linear (group-wise int4).

    `head`: the LM head's format, "int4" (default) or "int8". The head is a third of
    the bytes of the int8 model; measured on GPT-2 124M (1 CPU thread), an int8 head
    decodes ~12% slower than an int4 one and barely reduces the logit error, which
    comes mostly from the blocks. Group sizes 32..128 decode at the same speed; 32 has
    the smallest error.
    """
    if head not in ("int4", "int8"):
        raise FastGPTError(f"quantize_int4: head must be 'int4' or 'int8', got {head!r}")
    model.to(dtype).eval()
    for block in model.blocks:
        block.attn.qkv = Int4Linear(block.attn.qkv, group_size, dtype)
        block.attn.proj = Int4Linear(block.attn.proj, group_size, dtype)
        block.mlp.fc = Int4Linear(block.mlp.fc, group_size, dtype)
        block.mlp.proj = Int4Linear(block.mlp.proj, group_size, dtype)
    model.lm_head = Int4Linear(model.lm_head, group_size, dtype) if head == "int4" else Int8Linear(model.lm_head, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantize_int8(model, dtype: torch.dtype = torch.bfloat16):
    """Turn `model` (a GPT) into an inference-only model with int8 matrices, in place.

    Every projection (qkv, attention out, MLP fc and proj) and the LM head become
    Int8Linear; the rest (embeddings, LayerNorms) and the activations use `dtype`.
    The token embedding stays unquantized for lookups, so the LM head is no longer
    tied to it. Returns the model, in eval mode.
    """
    model.to(dtype).eval()
    for block in model.blocks:
        block.attn.qkv = Int8Linear(block.attn.qkv, dtype)
        block.attn.proj = Int8Linear(block.attn.proj, dtype)
        block.mlp.fc = Int8Linear(block.mlp.fc, dtype)
        block.mlp.proj = Int8Linear(block.mlp.proj, dtype)
    model.lm_head = Int8Linear(model.lm_head, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every matrix and vector once, one row of
    each embedding, and the whole token embedding again when it is the (tied) LM head
    (an untied head is a matrix among the parameters)."""
    embeddings = {"tok_emb.weight", "pos_emb.weight"}
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        rows_read = 1 if name in embeddings else t.shape[0] if t.dim() else 1
        total += rows_read * (t.numel() // max(t.shape[0], 1) if t.dim() else 1) * t.element_size()
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight:
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total
