"""The LM head projection and cross-entropy as one op.

The logits tensor (rows x vocab) is the largest activation of GPT-2: 8192 tokens x
50257 words is 823 MB in bf16, and eager autograd holds several tensors of that size
(the log-softmax it saves, then the gradients flowing back through it). The fused
version never builds it: it walks the rows in chunks, and for each chunk

    logits = hidden_chunk @ weight.T              (cuBLAS: the GEMM is not the problem)
    cross-entropy kernel -> per-row loss, and the gradient d loss / d logits written
                            in place over `logits` (no softmax ever stored)
    grad_hidden_chunk  = dlogits @ weight
    grad_weight       += dlogits.T @ hidden_chunk  (accumulated in fp32)

(the cross-entropy kernel of `cross_entropy.py` is its only Triton kernel). The
gradients are finished inside the forward pass (Liger-Kernel's approach) and backward
only scales them by the incoming grad_output. Peak extra memory is one
logits chunk plus the fp32 grad_weight accumulator, instead of several (N, V) tensors.
The weight may be tied to the token embedding: its gradient returns through the
weight argument and autograd adds it to the embedding's.

reduction="none" cannot finish the gradients early (each row's grad_output is only
known in backward), so it recomputes each logits chunk in backward instead.
"""
from __future__ import annotations

import torch

from ..config import VOCAB_PAD
from ..errors import FastGPTError
from ._custom_ops import kernel_op, new_output
from .cross_entropy import check_inputs, count_valid, launch_backward, launch_forward, reduce_rows
from .reference import check_vocab_size, linear_cross_entropy_reference  # noqa: F401  (the latter re-exported)

# Cost model of one chunk of `rows` rows (bytes moved, bf16 logits):
#   logits pass (GEMM out, kernel read x2 + write, two GEMMs in): ~6 * rows * V * 2
#   grad_weight accumulator read + write in fp32:                    2 * V * C * 4
# The second term is paid once per chunk whatever its height, so chunks of rows >= C
# keep it below the first; at rows = 2C the logits chunk holds as many bytes as the
# fp32 grad_weight itself (154 MB for GPT-2 at C = 768: 1536 rows of 50257).
CHUNK_ROWS_PER_CHANNEL = 2


def default_chunk_rows(N: int, C: int) -> int:
    """Rows per chunk: 2 * C (see the cost model above), at most N, at least 1."""
    return max(1, min(N, CHUNK_ROWS_PER_CHANNEL * C))


# Whether torch.addmm(..., out_dtype=float32) works here (CUDA builds of recent PyTorch):
# it lets cuBLAS add a bf16/fp16 product straight into the fp32 accumulator.
_mixed_precision_addmm = True


def _accumulate_grad_weight(grad_weight: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (fp32) += dlogits.T @ hidden, the product accumulated in fp32."""
    global _mixed_precision_addmm
    if dlogits.dtype == torch.float32:
        grad_weight.addmm_(dlogits.t(), hidden)
        return
    if dlogits.is_cuda and _mixed_precision_addmm:
        try:
            torch.addmm(grad_weight, dlogits.t(), hidden, out_dtype=torch.float32, out=grad_weight)
            return
        except (RuntimeError, TypeError):  # no mixed-dtype addmm in this PyTorch: use a temporary
            _mixed_precision_addmm = False
    grad_weight += torch.mm(dlogits.t(), hidden)  # product rounded once per chunk, summed in fp32


# The GEMMs run over a weight whose row count is a multiple of VOCAB_PAD. GPT-2's 50257 is
# odd, so bf16 logits rows would not be 16-byte aligned and cuBLAS falls back to slow
# unaligned kernels ("align1"): on an H100 the three GEMMs took 17 ms for 8192 x 768 x
# 50257 instead of ~3. The model stores its head padded already (GPTConfig.padded_vocab_size)
# and passes `vocab_size`; any other weight is padded here with zero rows, a copy per call.
# Only the first vocab_size logits columns are scored; the others get a zero gradient.


def _padded_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (V, C) with zero rows appended up to a multiple of VOCAB_PAD (itself if none needed)."""
    V = weight.shape[0]
    padded_v = -(-V // VOCAB_PAD) * VOCAB_PAD
    if padded_v == V:
        return weight
    padded = weight.new_zeros(padded_v, weight.shape[1])
    padded[:V] = weight
    return padded


def _logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """One flat scratch buffer reused by every chunk (the last, shorter chunk uses a prefix)."""
    rows = min(chunk_rows, hidden.shape[0])
    return torch.empty(rows * weight.shape[0], dtype=hidden.dtype, device=hidden.device)


# ----------------------------------------------------------------------------- custom ops
@kernel_op("linear_cross_entropy_fwd")
def _linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              ignore_index: int, reduction: str, chunk_rows: int, vocab_size: int,
                              need_grad_hidden: bool, need_grad_weight: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight): the gradients are those of the loss itself (grad_output 1),
    or empty (0,) tensors when not needed or when reduction="none" (recomputed in backward).
    Only the first `vocab_size` rows of `weight` are scored; grad_weight has the weight's shape."""
    N, V, rows = hidden.shape[0], vocab_size, weight.shape[0]
    write_grad = reduction != "none" and (need_grad_hidden or need_grad_weight)
    n_valid = count_valid(targets, ignore_index)
    row_loss = new_output(N, torch.float32, hidden.device)
    padded = _padded_weight(weight)
    Vp = padded.shape[0]
    grad_hidden = (new_output(hidden.shape, hidden.dtype, hidden.device)
                   if write_grad and need_grad_hidden else hidden.new_empty(0))
    grad_weight = (torch.zeros(padded.shape, dtype=torch.float32, device=weight.device)
                   if write_grad and need_grad_weight else weight.new_empty(0, dtype=torch.float32))
    # d(mean)/d(row loss) = 1 / n_valid; kept on the device so no host sync is needed.
    scale = (1.0 / n_valid if reduction == "mean" else torch.ones((), device=hidden.device)).reshape(1)
    buffer = _logits_buffer(hidden, padded, chunk_rows)
    for start in range(0, N, chunk_rows):
        end = min(N, start + chunk_rows)
        hidden_chunk = hidden[start:end]
        logits = torch.mm(hidden_chunk, padded.t(), out=buffer[: (end - start) * Vp].view(end - start, Vp))
        launch_forward(logits[:, :V], targets[start:end], ignore_index, scale if write_grad else None,
                       loss=row_loss[start:end])
        if write_grad:  # `logits` now holds d loss / d logits, once the unscored columns are zeroed
            logits[:, V:].zero_()
            if need_grad_hidden:
                torch.mm(logits, padded, out=grad_hidden[start:end])
            if need_grad_weight:
                _accumulate_grad_weight(grad_weight, logits, hidden_chunk)
    if grad_weight.numel():
        grad_weight = grad_weight[:rows]  # the weight's own rows: contiguous, no copy
    return reduce_rows(row_loss, n_valid, reduction), grad_hidden, grad_weight


@_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, ignore_index, reduction, chunk_rows, vocab_size, need_grad_hidden,
      need_grad_weight):
    write_grad = reduction != "none" and (need_grad_hidden or need_grad_weight)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape if write_grad and need_grad_hidden else (0,))
    grad_weight = weight.new_empty(weight.shape if write_grad and need_grad_weight else (0,), dtype=torch.float32)
    return loss, grad_hidden, grad_weight


@kernel_op("linear_cross_entropy_bwd_recompute")
def _linear_cross_entropy_bwd_recompute(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                        targets: torch.Tensor, ignore_index: int, chunk_rows: int, vocab_size: int
                                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for reduction="none": per-row grad_loss, logits recomputed chunk by chunk."""
    N, V, rows = hidden.shape[0], vocab_size, weight.shape[0]
    padded = _padded_weight(weight)
    Vp = padded.shape[0]
    grad_hidden = new_output(hidden.shape, hidden.dtype, hidden.device)
    grad_weight = torch.zeros(padded.shape, dtype=torch.float32, device=weight.device)
    grad_loss = grad_loss.to(torch.float32)
    buffer = _logits_buffer(hidden, padded, chunk_rows)
    for start in range(0, N, chunk_rows):
        end = min(N, start + chunk_rows)
        hidden_chunk = hidden[start:end]
        logits = torch.mm(hidden_chunk, padded.t(), out=buffer[: (end - start) * Vp].view(end - start, Vp))
        _, lse = launch_forward(logits[:, :V], targets[start:end], ignore_index)
        launch_backward(logits[:, :V], targets[start:end], lse, grad_loss[start:end], ignore_index,
                        grad=logits[:, :V])
        logits[:, V:].zero_()  # unscored columns: no gradient
        torch.mm(logits, padded, out=grad_hidden[start:end])
        _accumulate_grad_weight(grad_weight, logits, hidden_chunk)
    return grad_hidden, grad_weight[:rows]


@_linear_cross_entropy_bwd_recompute.register_fake
def _(grad_loss, hidden, weight, targets, ignore_index, chunk_rows, vocab_size):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index, reduction, chunk_rows, vocab_size, _, _ = inputs
    _, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.reduction, ctx.ignore_index, ctx.chunk_rows, ctx.vocab_size = reduction, ignore_index, chunk_rows, vocab_size
    ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight)


def _backward(ctx, grad_loss, _grad_hidden, _grad_weight):
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.reduction == "none":
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden, grad_weight = _linear_cross_entropy_bwd_recompute(
            grad_loss, hidden, weight, targets, ctx.ignore_index, ctx.chunk_rows, ctx.vocab_size)
        return (grad_hidden.to(ctx.hidden_dtype) if need_hidden else None,
                grad_weight.to(ctx.weight_dtype) if need_weight else None,
                None, None, None, None, None, None, None)
    # Finished in forward for grad_output = 1: scale by the real grad_output, casting the fp32
    # weight gradient to the weight's dtype in the same pass.
    grad_hidden, grad_weight = ctx.saved_tensors
    if need_hidden:
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
    if need_weight:
        grad_weight = torch.mul(grad_weight, grad_loss, out=torch.empty(
            grad_weight.shape, dtype=ctx.weight_dtype, device=grad_weight.device))
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            None, None, None, None, None, None, None)


_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int = -100, reduction: str = "mean",
                                chunk_rows: int | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Same contract as `linear_cross_entropy_reference`, without materialising (N, V) logits.
    Under autocast both operands take the autocast dtype, as `hidden @ weight.T` would. A weight
    whose rows are a multiple of VOCAB_PAD (the model's padded head) is used as it is, uncopied."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise FastGPTError(f"linear_cross_entropy: hidden (N, C) and weight (V, C) disagree: "
                           f"{tuple(hidden.shape)} vs {tuple(weight.shape)}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        raise FastGPTError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    check_vocab_size(vocab_size, weight.shape[0])
    N, V = hidden.shape[0], weight.shape[0] if vocab_size is None else vocab_size
    check_inputs(torch.empty((N, V), dtype=hidden.dtype, device="meta"), targets, ignore_index, reduction,
                 name="hidden @ weight.T")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(N, hidden.shape[1])
    if chunk_rows < 1:
        raise FastGPTError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    grad_on = torch.is_grad_enabled()
    with torch.autocast(device_type, enabled=False):
        loss, _, _ = _linear_cross_entropy_fwd(
            hidden.contiguous(), weight.contiguous(), targets.contiguous(), int(ignore_index), reduction,
            int(chunk_rows), int(V), grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return loss
