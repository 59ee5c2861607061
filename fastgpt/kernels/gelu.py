"""Bias add + GELU (tanh approximation), the MLP's activation in GPT-2.

The tanh form has a neater equivalent that the kernels use:
    0.5 u (1 + tanh(z)) = u * sigmoid(2 z),   z = sqrt(2/pi) (u + 0.044715 u^3),
because 1 + tanh(z) = 2 sigmoid(2z). With s = sigmoid(2z) the derivative is
    d/du = s + u * s (1 - s) * 2 sqrt(2/pi) (1 + 3 * 0.044715 u^2).

Triton design: the op is elementwise, so it is purely memory bound; fusing the
bias add saves one full read and write of the (rows, 4C) activation.
* forward: 2-D tiles of (BLOCK_M rows, BLOCK_N columns); reads x and the bias slice
  once, writes the output once.
* backward recomputes u = x + bias from the saved *input* rather than saving the
  output or the derivative: nothing but x is kept for backward. It reads x and dy,
  writes dx, and sums dx over rows for dbias. Each program owns a column block and a
  contiguous run of row tiles, accumulates its column sums in fp32 registers and
  writes one partial row of a (row_groups, C) buffer, summed afterwards by torch;
  no atomics, no program waits on another.
Strides: a row stride is passed; the last dim must be unit-stride (the wrapper
copies only when no such (rows, C) view exists). Output in x's dtype, math in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import FastGPTError
from ._custom_ops import as_rows, kernel_op, new_output, num_sms, on_device_of
from .reference import GELU_CUBIC, SQRT_2_OVER_PI, bias_gelu_reference  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------- kernels
_K = tl.constexpr(SQRT_2_OVER_PI)
_A = tl.constexpr(GELU_CUBIC)


@triton.jit
def _sigmoid_2z(u):
    """(s, 1 - s) for s = sigmoid(2z) = (1 + tanh(z)) / 2, z = sqrt(2/pi) (u + 0.044715 u^3).

    1 - s is computed as e * s (e = exp(-2z)), not by subtraction, which would lose
    all its digits where s is close to 1."""
    z2 = 2.0 * _K * (u + _A * u * u * u)
    z2 = tl.maximum(z2, -80.0)  # exp(80) still fits fp32; sigmoid(-80) ~ 1e-35 is 0 to any caller
    e = tl.exp(-z2)
    s = 1.0 / (1.0 + e)
    return s, e * s


@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, N, C, stride_x, stride_y,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + cols, mask=cols < C, other=0.0).to(tl.float32)
    u = x + bias[None, :]
    s, _ = _sigmoid_2z(u)
    y = u * s
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(X, BIAS, DY, DX, DBIAS_PARTIAL, N, C, stride_x, stride_dy, stride_dx,
                          tiles_per_program,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column block program_id(1), row tiles [program_id(0) * tiles_per_program, ...)."""
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < C
    bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = group * tiles_per_program * BLOCK_M
    for tile in range(0, tiles_per_program):
        rows = first_row + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < N) & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = x + bias[None, :]
        s, one_minus_s = _sigmoid_2z(u)
        dz2_du = 2.0 * _K * (1.0 + 3.0 * _A * u * u)
        dx = dy * (s + u * s * one_minus_s * dz2_du)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dbias += tl.sum(tl.where(mask, dx, 0.0), axis=0)
    tl.store(DBIAS_PARTIAL + group * C + cols, dbias, mask=col_mask)


def _tiles(C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~2048 elements per tile, at most 256 columns wide."""
    block_n = min(256, max(16, triton.next_power_of_2(C)))
    return max(1, 2048 // block_n), block_n, 4


def _check(x: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() == 0 or bias.shape != (x.shape[-1],):
        raise FastGPTError(f"bias_gelu: expected x (..., C) and bias (C,), got x {tuple(x.shape)}, "
                           f"bias {tuple(bias.shape)}")
    if x.device != bias.device:
        raise FastGPTError(f"bias_gelu: x on {x.device} but bias on {bias.device}")


def _forward(x, bias):
    x2 = as_rows(x)
    N, C = x2.shape
    y = new_output(x.shape, x.dtype, x.device)
    if N and C:
        BLOCK_M, BLOCK_N, num_warps = _tiles(C)
        grid = (triton.cdiv(N, BLOCK_M), triton.cdiv(C, BLOCK_N))
        with on_device_of(x):
            _bias_gelu_fwd_kernel[grid](x2, bias, y, N, C, x2.stride(0), C,
                                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    return y


def _backward(dy, x, bias):
    x2, dy2 = as_rows(x), as_rows(dy)
    N, C = x2.shape
    dx = new_output(x.shape, x.dtype, x.device)
    BLOCK_M, BLOCK_N, num_warps = _tiles(max(C, 1))
    col_blocks = triton.cdiv(C, BLOCK_N)
    row_tiles = triton.cdiv(N, BLOCK_M)
    # enough programs to fill the GPU (~4 per SM), never more than there are row tiles
    groups = max(1, min(row_tiles, triton.cdiv(4 * num_sms(x.device), max(col_blocks, 1))))
    tiles_per_program = triton.cdiv(row_tiles, groups)
    groups = max(1, triton.cdiv(row_tiles, max(tiles_per_program, 1)))  # drop programs left without rows
    dbias_partial = new_output((groups, C), torch.float32, x.device)
    if N and C:
        with on_device_of(x):
            _bias_gelu_bwd_kernel[(groups, col_blocks)](
                x2, bias, dy2, dx, dbias_partial, N, C, x2.stride(0), dy2.stride(0), C, tiles_per_program,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    else:
        dbias_partial.zero_()
    return dx, dbias_partial.sum(0).to(bias.dtype)


# --------------------------------------------------- torch.library ops and their autograd
@kernel_op("bias_gelu_fwd")
def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _forward(x, bias)


@_bias_gelu_fwd.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@kernel_op("bias_gelu_bwd")
def _bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, x, bias)


@_bias_gelu_bwd.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)  # the input only: backward recomputes the activation


def _bias_gelu_grad(ctx, dy):
    x, bias = ctx.saved_tensors
    return _bias_gelu_bwd(dy, x, bias)


_bias_gelu_fwd.register_autograd(_bias_gelu_grad, setup_context=_bias_gelu_setup)


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias) in one pass, differentiable in x and bias. Output in x's dtype."""
    _check(x, bias)
    return _bias_gelu_fwd(x, bias)


# ------------------------------------------------------------------- compile-only check
def compile_specs():
    """Both kernels at GPT-2 small (4C = 3072) width, fp16 and bf16 activations, fp32 bias."""
    from .compile_check import KernelSpec
    BLOCK_M, BLOCK_N, num_warps = _tiles(3072)
    specs = []
    for dt in ("fp16", "bf16"):
        specs.append(KernelSpec(f"bias_gelu_fwd[C=3072,{dt}]", _bias_gelu_fwd_kernel, {
            "X": f"*{dt}", "BIAS": "*fp32", "Y": f"*{dt}", "N": "i32", "C": "i32",
            "stride_x": "i32", "stride_y": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
            {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}, num_warps=num_warps))
        specs.append(KernelSpec(f"bias_gelu_bwd[C=3072,{dt}]", _bias_gelu_bwd_kernel, {
            "X": f"*{dt}", "BIAS": "*fp32", "DY": f"*{dt}", "DX": f"*{dt}", "DBIAS_PARTIAL": "*fp32",
            "N": "i32", "C": "i32", "stride_x": "i32", "stride_dy": "i32", "stride_dx": "i32",
            "tiles_per_program": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
            {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}, num_warps=num_warps))
    return specs
