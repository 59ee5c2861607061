"""Cross-entropy of logits against integer targets.

The Triton version reads each row of logits once in the forward pass: an online
logsumexp keeps a running maximum and a running sum of exponentials while it walks
the vocabulary in BLOCK_V chunks, so a 50257-wide row never has to fit in registers
and never needs a separate "find the max" pass. The loss of a row is
lse - logit[target].

Gradient: d loss / d logit_j = softmax_j - [j == target] = exp(logit_j - lse) - onehot.
Two ways to get it without storing a softmax:
  * recompute in backward from the saved per-row lse (used by `cross_entropy_triton`):
    extra memory is N floats; backward reads the logits once more and writes the gradient.
    The logits are kept alive by autograd anyway, so this costs no extra (N, V) buffer.
  * write it in the forward pass, in place over a logits buffer the caller owns
    (WRITE_GRAD=True; used by the fused linear + cross-entropy, whose logits chunk is
    scratch memory): no second kernel, no saved lse, and the logits are gone afterwards.

Rows whose target equals `ignore_index` give 0 loss and 0 gradient and are not
counted in the mean's denominator (all rows ignored -> mean is nan, as in PyTorch).
Math is fp32 whatever the logits dtype; row offsets are 64-bit so N * V >= 2**31 works.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import FastGPTError
from ._custom_ops import kernel_op, new_output
from .reference import cross_entropy_reference  # noqa: F401  (re-exported beside its kernels)

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _row_start(row, row_stride):
    """Offset of a row's first element, in 64 bits: row * row_stride overflows int32 once
    N * V >= 2**31 (e.g. 43k rows of GPT-2's 50257-wide logits)."""
    return row.to(tl.int64) * row_stride


@triton.jit
def _row_logsumexp(row_ptr, V, BLOCK_V: tl.constexpr):
    """log(sum_j exp(x_j)) of one row in a single pass (online max + rescaled sum)."""
    cols = tl.arange(0, BLOCK_V)
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # Rescale what was summed under the old maximum, then add this block.
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def _write_row_grad(row_ptr, grad_row_ptr, V, lse, target, scale, BLOCK_V: tl.constexpr):
    """grad_j = scale * (exp(x_j - lse) - [j == target]); may write over the row it reads."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
        tl.store(grad_row_ptr + start + cols, (grad * scale).to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_row_zeros(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        tl.store(grad_row_ptr + start + cols, tl.zeros([BLOCK_V], dtype=grad_row_ptr.dtype.element_ty),
                 mask=start + cols < V)


@triton.jit
def _cross_entropy_fwd_kernel(logits_ptr, logits_row_stride, targets_ptr, loss_ptr, lse_ptr,
                              grad_scale_ptr, V, ignore_index,
                              BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """One program per row: loss[row] and lse[row]; with WRITE_GRAD, the row's gradient
    (times grad_scale[0]) replaces its logits in place."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + _row_start(row, logits_row_stride)
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            _write_row_zeros(row_ptr, V, BLOCK_V)
    else:
        lse = _row_logsumexp(row_ptr, V, BLOCK_V)
        # A target outside [0, V) is never read: its row's loss becomes nan. Checking targets
        # here would cost a host sync per call; callers check the host batch once instead
        # (fastgpt.ops.check_targets).
        in_vocab = (target >= 0) & (target < V)
        target_logit = tl.load(row_ptr + target, mask=in_vocab, other=float("nan")).to(tl.float32)
        tl.store(loss_ptr + row, lse - target_logit)
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            _write_row_grad(row_ptr, row_ptr, V, lse, target, tl.load(grad_scale_ptr), BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(logits_ptr, logits_row_stride, targets_ptr, lse_ptr,
                              grad_scale_ptr, grad_scale_stride, grad_ptr, grad_row_stride, V, ignore_index,
                              BLOCK_V: tl.constexpr):
    """grad[row] = grad_scale[row] * (softmax(logits[row]) - onehot(target)), from the saved lse.
    grad_scale_stride is 0 for mean/sum (one scalar for all rows), 1 for reduction='none'."""
    row = tl.program_id(0)
    grad_row_ptr = grad_ptr + _row_start(row, grad_row_stride)
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        _write_row_zeros(grad_row_ptr, V, BLOCK_V)
    else:
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride)
        _write_row_grad(logits_ptr + _row_start(row, logits_row_stride), grad_row_ptr, V,
                        tl.load(lse_ptr + row), target, scale, BLOCK_V)


# ----------------------------------------------------------------------------- launch helpers
# Columns per loop step, and per thread. At 8 values a thread the kernels need 30-46
# registers on sm_90 (16 values: up to 90), so an SM holds several row programs at once
# and one program's reductions hide behind the others' loads. Not yet tuned by timing.
MAX_BLOCK_V = 2048
VALUES_PER_THREAD = 8


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of width V."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    num_warps = max(1, min(8, block // (32 * VALUES_PER_THREAD)))
    return block, num_warps


def check_inputs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
                 name: str = "logits") -> None:
    """Shapes and dtypes; bad input raises FastGPTError, never a wrong loss."""
    if reduction not in REDUCTIONS:
        raise FastGPTError(f"cross_entropy: reduction={reduction!r} (choose from: {', '.join(REDUCTIONS)})")
    if logits.dim() != 2:
        raise FastGPTError(f"cross_entropy: {name} must be 2-D (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FastGPTError(f"cross_entropy: {name} dtype {logits.dtype} is not fp32, fp16 or bf16")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise FastGPTError(f"cross_entropy: targets must have shape ({logits.shape[0]},), "
                           f"got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise FastGPTError(f"cross_entropy: targets dtype {targets.dtype} is not an integer type")


def launch_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                   grad_scale: torch.Tensor | None = None,
                   loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse) in fp32 (`loss` may be given: a contiguous (N,) fp32 slice to fill).
    With `grad_scale` (a 1-element fp32 tensor) the gradient times grad_scale overwrites
    `logits` in place. Logits need unit column stride."""
    N, V = logits.shape
    if loss is None:
        loss = new_output(N, torch.float32, logits.device)
    lse = new_output(N, torch.float32, logits.device)
    if N == 0:
        return loss, lse
    block, num_warps = launch_config(V)
    write_grad = grad_scale is not None
    _cross_entropy_fwd_kernel[(N,)](
        logits, logits.stride(0), targets, loss, lse, grad_scale if write_grad else loss, V, ignore_index,
        BLOCK_V=block, WRITE_GRAD=write_grad, num_warps=num_warps)
    return loss, lse


def launch_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_scale: torch.Tensor,
                    ignore_index: int, grad: torch.Tensor) -> torch.Tensor:
    """grad = grad_scale * (softmax(logits) - onehot(targets)), ignored rows 0. `grad_scale`
    is one fp32 value for every row or one per row; `grad` (unit column stride) may be `logits`."""
    N, V = logits.shape
    if N == 0:
        return grad
    scale = grad_scale.reshape(-1).contiguous()
    block, num_warps = launch_config(V)
    _cross_entropy_bwd_kernel[(N,)](
        logits, logits.stride(0), targets, lse, scale, 1 if scale.numel() > 1 else 0, grad, grad.stride(0), V,
        ignore_index, BLOCK_V=block, num_warps=num_warps)
    return grad


def reduce_rows(row_loss: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total / n_valid if reduction == "mean" else total


def count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of non-ignored rows, as an fp32 tensor on the device (no host sync)."""
    return (targets != ignore_index).sum().to(torch.float32)


# ----------------------------------------------------------------------------- custom ops + autograd
@kernel_op("cross_entropy_fwd")
def _cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                       reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse): the reduced loss and the per-row logsumexp that backward recomputes from."""
    row_loss, lse = launch_forward(logits, targets, ignore_index)
    return reduce_rows(row_loss, count_valid(targets, ignore_index), reduction), lse


@_cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, reduction):
    N = logits.shape[0]
    loss_shape = (N,) if reduction == "none" else ()
    return logits.new_empty(loss_shape, dtype=torch.float32), logits.new_empty((N,), dtype=torch.float32)


@kernel_op("cross_entropy_bwd")
def _cross_entropy_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                       lse: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    grad = new_output(logits.shape, logits.dtype, logits.device)
    grad_loss = grad_loss.to(torch.float32)
    if reduction == "mean":
        grad_loss = grad_loss / count_valid(targets, ignore_index)
    launch_backward(logits, targets, lse, grad_loss, ignore_index, grad)
    return grad


@_cross_entropy_bwd.register_fake
def _(grad_loss, logits, targets, lse, ignore_index, reduction):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, reduction = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index, ctx.reduction = ignore_index, reduction


def _backward(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    grad = _cross_entropy_bwd(grad_loss, logits, targets, lse, ctx.ignore_index, ctx.reduction)
    return grad, None, None, None


_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    """Same contract as `cross_entropy_reference`: fp32 loss; gradient in the logits' dtype."""
    check_inputs(logits, targets, ignore_index, reduction)
    if logits.stride(1) != 1:  # rows may be strided (row stride != V); columns must be dense
        logits = logits.contiguous()
    loss, _ = _cross_entropy_fwd(logits, targets.contiguous(), int(ignore_index), reduction)
    return loss


# ----------------------------------------------------------------------------- compile-only check
def compile_specs():
    """Every @triton.jit kernel of this module at GPT-2 shapes (V = 50257), per logits dtype."""
    from .compile_check import KernelSpec
    block, num_warps = launch_config(50257)
    specs = []
    for dtype in ("fp32", "bf16"):
        for write_grad in (False, True):  # standalone forward / fused (gradient in place)
            specs.append(KernelSpec(
                name=f"cross_entropy_fwd[{dtype}{',grad' if write_grad else ''}]", fn=_cross_entropy_fwd_kernel,
                signature={"logits_ptr": f"*{dtype}", "logits_row_stride": "i32", "targets_ptr": "*i64",
                           "loss_ptr": "*fp32", "lse_ptr": "*fp32", "grad_scale_ptr": "*fp32",
                           "V": "i32", "ignore_index": "i32"},
                constexprs={"BLOCK_V": block, "WRITE_GRAD": write_grad}, num_warps=num_warps))
        specs.append(KernelSpec(
            name=f"cross_entropy_bwd[{dtype}]", fn=_cross_entropy_bwd_kernel,
            signature={"logits_ptr": f"*{dtype}", "logits_row_stride": "i32", "targets_ptr": "*i64",
                       "lse_ptr": "*fp32", "grad_scale_ptr": "*fp32", "grad_scale_stride": "i32",
                       "grad_ptr": f"*{dtype}", "grad_row_stride": "i32", "V": "i32", "ignore_index": "i32"},
            constexprs={"BLOCK_V": block}, num_warps=num_warps))
    return specs
