"""The fast path where no Triton kernel runs (CPUs): PyTorch's own fused kernels, and the
LM head's loss arranged so that its GEMMs stay aligned and its softmax runs once.

The references in `reference.py` write each op out step by step, which is what a reader
and the tests want, but on a CPU three of them are slow: the tanh-GELU formula makes nine
passes over a (B, T, 4C) tensor forward and more backward, and causal attention builds the
(T, T) score matrix, a mask and a softmax in every layer. Measured per layer, forward +
backward, GPT-2 124M at B=4, T=256 on a 2-core EPYC: GELU 1601 -> 284 ms with `F.gelu`,
attention 1036 -> 655 ms with `F.scaled_dot_product_attention` (its CPU flash kernel)
(benchmarks/results/2026-11-29-cpu-train/). The LM head's loss sliced the padded head to
its 50257 real rows, and MKL ran that GEMM at 113 GFLOP/s against 146 over all 50304 rows
(x (1024, 768); 701 -> 549 ms on the 2-core EPYC of 2026-11-30); `_LinearCrossEntropy`
multiplies by every row and gives the pad columns -inf instead. Same mathematics, rounding
aside.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FastGPTError
from .reference import check_vocab_size


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


SOFTMAX_CHUNK_BYTES = 8 << 20  # rows of logits per softmax pass: a chunk stays in cache between its passes


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and d loss / d logits in one forward pass over fp32 logits.

    The loss is the graph's end, so the gradient of the logits, softmax - one_hot, is known
    while the forward holds them: each chunk of rows goes through log_softmax (the loss) and
    exp (the gradient) while it is in cache, the logits are freed, and the backward is the two
    GEMMs alone, the incoming gradient's scale applied to the small (N, C) side. Autograd's way
    keeps the log-probabilities, then fills a zero tensor of the logits' size, scatters, and
    runs log_softmax's backward: three more passes over (N, V), and twice the memory.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, reduction: str, vocab_size: int):
        logits = hidden @ weight.t()  # over every row of weight: an aligned GEMM
        logits[:, vocab_size:] = float("-inf")  # pad columns: no token, so no probability and no gradient
        grad = torch.empty_like(logits)
        keep = targets != ignore_index
        ignored = (~keep).unsqueeze(1)
        safe = torch.where(keep, targets, 0).unsqueeze(1)
        losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        rows = max(1, SOFTMAX_CHUNK_BYTES // (logits.element_size() * logits.shape[1]))
        for r0 in range(0, logits.shape[0], rows):
            log_p = torch.log_softmax(logits[r0:r0 + rows], dim=-1)
            losses[r0:r0 + rows] = log_p.gather(1, safe[r0:r0 + rows]).squeeze(1).neg()
            log_p.masked_fill_(ignored[r0:r0 + rows], float("-inf"))  # ignored rows: no gradient
            torch.exp(log_p, out=grad[r0:r0 + rows])
        del logits
        losses = losses.masked_fill(ignored[:, 0], 0.0)
        # the target's entry: p - 1, from the fp32 loss (p = exp(-loss)), not from the rounded p
        grad.scatter_(1, safe, torch.where(keep, torch.expm1(-losses), 0.0).unsqueeze(1))
        count = keep.sum()
        ctx.reduction = reduction
        ctx.save_for_backward(hidden, weight, grad, count)
        if reduction == "mean":
            return losses.sum() / count
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, grad, count = ctx.saved_tensors
        if ctx.reduction == "mean":
            scale = grad_loss / count
        elif ctx.reduction == "sum":
            scale = grad_loss
        else:
            scale = grad_loss.unsqueeze(1)  # one per row
        d_hidden = d_weight = None
        if ctx.needs_input_grad[0]:
            d_hidden = (grad @ weight) * scale
        if ctx.needs_input_grad[1]:
            d_weight = grad.t() @ (hidden * scale)
        return d_hidden, d_weight, None, None, None, None


def linear_cross_entropy_fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean",
                               vocab_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight[:vocab_size].T, targets), the GEMMs over every row of
    `weight` (a padded head's pad rows get exactly zero gradient). Eager fp32: the loss's
    gradient is written during the forward (`_LinearCrossEntropy`). Otherwise autograd's own
    loss over the vocabulary's columns of the logits: under autocast the in-forward gradient
    would be written in 16 bits, whose conversions cost what its saved passes gain (profiled
    on the 4 x 256 demo model, bf16); under torch.compile inductor fuses that loss itself, and
    its kernel for it ran in half the time of the traced chunk loop (6 x 384, 37 vs 78 ms)."""
    check_vocab_size(vocab_size, weight.shape[0])
    if reduction not in ("mean", "sum", "none"):
        raise FastGPTError(f"linear_cross_entropy: reduction must be mean, sum or none, got {reduction!r}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if _computes_in_fp32(hidden, weight) and not torch.compiler.is_compiling():
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, reduction, vocab_size)
    logits = (hidden @ weight.t())[:, :vocab_size]  # the GEMM over every row, then the vocabulary's columns
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


def _computes_in_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether hidden @ weight.T runs in fp32: both are fp32 and autocast, if on, keeps them so."""
    device = hidden.device.type
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) == torch.float32
