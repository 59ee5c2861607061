"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

FLOPs per trained token (PaLM appendix B, as in nanoGPT):

    6 * N  +  12 * L * H * Q * T

N: parameters taking part in matmuls (all weights except the position
embedding; the token embedding counts once, as the tied LM head, or not at
all next to an untied head: a lookup is no matmul). 6N is the
forward (2N) plus backward (4N) cost of the weight matmuls; the second term is
attention's QK^T and AV products (L layers, H heads, head dim Q, context T),
forward and backward, ignoring the causal mask's halving as PaLM does.
Activation recomputation is not counted: MFU measures useful model FLOPs.
"""
from __future__ import annotations

import torch

# Dense (no sparsity) peak TFLOP/s: (bf16/fp16 tensor cores, tf32 tensor cores, plain fp32).
# Order matters: more specific names first. Sources: NVIDIA datasheets/whitepapers.
PEAK_TFLOPS: list[tuple[tuple[str, ...], tuple[float, float, float]]] = [
    (("H100", "PCIE"), (756.0, 378.0, 51.0)),
    (("H100", "NVL"), (835.0, 418.0, 60.0)),
    (("H100",), (989.4, 494.7, 66.9)),          # SXM5
    (("H200", "NVL"), (835.0, 418.0, 60.0)),
    (("H200",), (989.4, 494.7, 66.9)),          # SXM
    (("A100",), (312.0, 156.0, 19.5)),
    (("A10G",), (70.0, 35.0, 31.2)),
    (("A10",), (125.0, 62.5, 31.2)),
    (("L4",), (121.0, 60.0, 30.3)),
    (("4090",), (165.2, 82.6, 82.6)),           # fp16/bf16 with fp32 accumulate
    (("3090",), (71.0, 35.6, 35.6)),
    (("V100",), (125.0, 15.7, 15.7)),           # fp16 only; no tf32
    (("T4",), (65.0, 8.1, 8.1)),                # fp16 only; no tf32
]


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, context_length: int) -> int:
    return 6 * n_params + 12 * n_layer * n_head * head_dim * context_length


def model_flops_per_token(model, context_length: int) -> int:
    cfg = model.config
    # num_parameters leaves out the vocabulary's pad rows: only real tokens are useful work
    n = model.num_parameters() - model.pos_emb.weight.numel()
    if model.lm_head.weight is not model.tok_emb.weight:  # untied: the token embedding is only looked up
        n -= cfg.vocab_size * cfg.n_embd
    return flops_per_token(n, cfg.n_layer, cfg.n_head, cfg.head_dim, context_length)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of `device` for matmuls in `dtype`, or None when unknown (or a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for keys, (half, tf32, fp32) in PEAK_TFLOPS:
        if all(k in name for k in keys):
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            tf32_on = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
            return (tf32 if tf32_on else fp32) * 1e12
    return None


def mfu_text(tokens_per_second: float, flops_token: int, device: torch.device, dtype: torch.dtype,
             world_size: int = 1) -> str:
    """'MFU 41.2%', 'MFU n/a (CPU)' or 'MFU n/a' for a GPU without a known peak."""
    if device.type == "cpu":
        return "MFU n/a (CPU)"
    peak = peak_flops(device, dtype)
    if peak is None:
        return "MFU n/a"
    return f"MFU {100.0 * tokens_per_second * flops_token / (peak * world_size):.1f}%"


def mfu_value(tokens_per_second: float, flops_token: int, device: torch.device, dtype: torch.dtype,
              world_size: int = 1) -> float | None:
    peak = peak_flops(device, dtype)
    return None if peak is None else tokens_per_second * flops_token / (peak * world_size)
