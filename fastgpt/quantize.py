"""Weight-only int8 quantization, for fast decoding on CPUs.

Decoding one sequence reads every weight once per token, so its speed is set by
memory bandwidth / bytes of weights. Storing each matrix row as int8 plus one
scale per row (symmetric, absmax / 127) reads 4x fewer bytes than float32; the
matmul converts on the fly (on CPU: ATen's `_weight_int8pack_mm`, bf16 activations).

This is an approximation: each weight moves by up to half a quantization step
(absmax / 254 of its row), so logits change slightly and greedy text can differ
from the float model's. Inference only: the quantized layers hold no gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    each embedding, and the whole token embedding again when it is the (tied) LM head."""
    embeddings = {"tok_emb.weight", "pos_emb.weight"}
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        rows_read = 1 if name in embeddings else t.shape[0] if t.dim() else 1
        total += rows_read * (t.numel() // max(t.shape[0], 1) if t.dim() else 1) * t.element_size()
    if isinstance(model.lm_head, nn.Linear):
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total
