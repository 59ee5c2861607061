"""LayerNorm, and LayerNorm fused with the residual add that precedes it.

y = (x - mean) / sqrt(var + eps) * weight + bias, statistics over the last dim.

Triton design (one row = one GPT-2 token's C features):
* forward: one program per row; the whole row sits in registers (BLOCK_C >= C), so
  x is read once, mean and variance come from two in-register reductions in fp32,
  and y is written once. mean and rstd = 1/sqrt(var + eps) are saved per row (fp32)
  so the backward pass does not recompute the reductions.
* fused residual add: the same kernel reads residual and x, writes their sum (the new
  residual stream) and the normed sum; one launch and one read of each input instead
  of an add kernel followed by a LayerNorm kernel.
* backward: a persistent grid of three programs per SM, each walking a contiguous run
  of rows, a tile of up to 4 rows at a time. dx of a row needs only that row;
  dweight and dbias are sums over all rows, so each program accumulates its rows'
  contributions in fp32 registers and writes one partial row of each into a
  (2, programs, C) buffer.
* reduction: one more small kernel sums those partials over programs in fp32, in a
  fixed order (bit-identical reruns), and writes dweight and dbias in the weight's dtype:
  one launch instead of torch's two sums and two casts (see `_backward` for why not
  reduce inside the backward kernel).
* means are sums times 1/C (computed once on the host), not sums / C: Triton's fp32
  division on a GPU is approximate (2 ulp), even by 1, and at width 1 the backward
  multiplies that rounding by rstd = 1/sqrt(eps) ~ 316 (an H100 showed 1.3e-5 there).
  No atomics or locks: programs never wait on each other.

Strides: the kernels take a row stride and need unit stride along C. The wrappers
view inputs as (rows, C) without copying when possible (a column slice of a wider
tensor is fine) and copy to contiguous memory only when no such view exists.
Widths up to 65536 (the whole row must fit one program's registers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import FastGPTError
from ._custom_ops import as_rows, kernel_op, new_output, num_sms, on_device_of
from .reference import add_layer_norm_reference, layer_norm_reference  # noqa: F401  (re-exported)

MAX_WIDTH = 65536


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _layer_norm_fwd_kernel(X, RESIDUAL, W, B, Y, RESIDUAL_OUT, MEAN, RSTD,
                           stride_x, stride_residual, stride_y, stride_residual_out,
                           C, inv_C, eps,
                           HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr):
    """One row: [new residual = residual + x;] y = LayerNorm(row)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(RESIDUAL + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(RESIDUAL_OUT.dtype.element_ty)
        tl.store(RESIDUAL_OUT + row * stride_residual_out + cols, x, mask=mask)
        x = x.to(tl.float32)  # normalize exactly the residual that was stored
    mean = tl.sum(x, axis=0) * inv_C
    centered = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) * inv_C
    rstd = tl.rsqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(X, W, MEAN, RSTD, DY, DRESIDUAL, DX, PARTIAL,
                           stride_x, stride_dy, stride_dresidual, stride_dx,
                           N, C, inv_C, tiles_per_program,
                           HAS_DRESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row tiles [pid * tiles_per_program, ...) of BLOCK_M rows each: dx for every row,
    and this program's share of dweight and dbias: rows pid and programs + pid of PARTIAL
    (2, programs, C).

    With xhat = (x - mean) * rstd and g = dy * weight, per row:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   [+ dresidual]
    A tile of several rows keeps more loads in flight than one row at a time.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w
        mean_g = tl.sum(g, axis=1)[:, None] * inv_C
        mean_gx = tl.sum(g * xhat, axis=1)[:, None] * inv_C
        dx = (g - mean_g - xhat * mean_gx) * rstd
        if HAS_DRESIDUAL:
            dx += tl.load(DRESIDUAL + rows64 * stride_dresidual + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(PARTIAL + pid * C + cols, dw, mask=col_mask)
    tl.store(PARTIAL + (tl.num_programs(0) + pid) * C + cols, db, mask=col_mask)


@triton.jit
def _layer_norm_bwd_reduce_kernel(PARTIAL, DW, DB, programs, C,
                                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns [pid0 * BLOCK_C, ...) of dweight (pid1 = 0) or dbias (pid1 = 1): the sum over
    the backward's `programs` fp32 partial rows (none: zeros), cast to the output's dtype.
    Fixed tiles and a fixed tree sum at the end, so reruns are bit-identical."""
    which = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    base = PARTIAL + which.to(tl.int64) * programs * C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for start in range(0, programs, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < programs)[:, None] & col_mask[None, :]
        acc += tl.load(base + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if which == 0:
        tl.store(DW + cols, total.to(DW.dtype.element_ty), mask=col_mask)
    else:
        tl.store(DB + cols, total.to(DB.dtype.element_ty), mask=col_mask)


def _block_and_warps(C: int) -> tuple[int, int]:
    """Forward: the whole row in one block; more warps for wider rows (~8 fp32 per thread)."""
    if C > MAX_WIDTH:
        raise FastGPTError(f"layer_norm: width {C} exceeds the Triton kernel's maximum of {MAX_WIDTH}")
    block = max(16, triton.next_power_of_2(C))
    return block, min(16, max(1, block // 256))


def _backward_tile(C: int) -> tuple[int, int, int]:
    """Backward: (BLOCK_M rows, BLOCK_C, num_warps), tiles of >= 2048 elements, ~16 per thread."""
    block, _ = _block_and_warps(C)
    block_m = max(1, min(4, 2048 // block))
    return block_m, block, min(16, max(4, block_m * block // 512))


# Partials reduction: 32 fp32 columns = one 128-byte line per partial row, 64 rows per load
# (16 fp32 per thread at 4 warps); C=768 gives 24 x 2 programs. Not tuned on a GPU.
REDUCE_BLOCK_P, REDUCE_BLOCK_C, REDUCE_WARPS = 64, 32, 4


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, what: str) -> None:
    C = x.shape[-1] if x.dim() else 0
    if C == 0 or weight.shape != (C,) or bias.shape != (C,):
        raise FastGPTError(f"{what}: expected x (..., C) with weight and bias (C,), got x {tuple(x.shape)}, "
                           f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    if not (x.device == weight.device == bias.device):
        raise FastGPTError(f"{what}: x on {x.device}, weight on {weight.device}, bias on {bias.device}; "
                           "the kernel needs them on one device")


def _forward(x, residual, weight, bias, eps, y_dtype=None):
    """Launch the forward kernel. Returns (y, new_residual or None, mean, rstd); y in
    `y_dtype` when given (the autocast dtype), else in the inputs' (promoted) dtype."""
    C = x.shape[-1]
    x2 = as_rows(x)
    N = x2.shape[0]
    out_dtype = x.dtype if residual is None else torch.result_type(residual, x)
    y = new_output(x.shape, y_dtype or out_dtype, x.device)
    mean = new_output(x.shape[:-1], torch.float32, x.device)
    rstd = new_output(x.shape[:-1], torch.float32, x.device)
    new_residual = None
    if residual is not None:
        res2 = as_rows(residual)
        new_residual = new_output(x.shape, out_dtype, x.device)
    if N == 0:
        return y, new_residual, mean, rstd
    BLOCK_C, num_warps = _block_and_warps(C)
    with on_device_of(x):
        _layer_norm_fwd_kernel[(N,)](
            x2, res2 if residual is not None else x2, weight, bias, y, new_residual if residual is not None else y,
            mean, rstd,
            x2.stride(0), res2.stride(0) if residual is not None else 0, C, C,
            C, 1.0 / C, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return y, new_residual, mean, rstd


def _backward(dy, x, weight, mean, rstd, dresidual):
    """Launch the backward kernel, then the dweight/dbias reduction. x is the normalized input
    (the new residual when fused)."""
    C = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)
    N = x2.shape[0]
    dx = new_output(x.shape, x.dtype, x.device)
    BLOCK_M, BLOCK_C, num_warps = _backward_tile(C)
    row_tiles = triton.cdiv(N, BLOCK_M)
    # Three programs per SM: at C=768 that is ~18 KB of loads in flight per SM (about what
    # an H100 needs near peak bandwidth), all three fit on an SM at once at the <= 168
    # registers ptxas uses (one wave). The fp32 partials (2 x programs x C, 2.4 MB on an
    # H100 at C=768, written once and read once by the reduction) add ~13% to the 38 MB of
    # bf16 x, dy and dx. On an H100 the kernel ran 18.7 us at 8192 x 768 bf16 (~2 TB/s) with
    # the partials then summed by torch; not tuned further.
    programs = max(1, min(row_tiles, 3 * num_sms(x.device)))
    tiles_per_program = triton.cdiv(row_tiles, programs)
    programs = max(1, triton.cdiv(row_tiles, tiles_per_program)) if N else 1  # none left without rows

    # dweight/dbias: the partials are summed by one small kernel (one launch for both,
    # fixed order). Summing inside this kernel instead would take either float atomics
    # (their order varies from run to run, and bit-exact resume needs reruns to agree) or
    # a "last program to finish sums everything" scheme, which needs a counter zeroed
    # before every launch (another launch, or state kept between calls), memory fences,
    # and leaves the whole (2, programs, C) sum to one SM; a second launch spreads it.
    partial = new_output((2, programs, C), torch.float32, x.device)
    if N:
        dres2 = as_rows(dresidual) if dresidual is not None else dy2
        with on_device_of(x):
            _layer_norm_bwd_kernel[(programs,)](
                x2, weight, mean, rstd, dy2, dres2, dx, partial,
                x2.stride(0), dy2.stride(0), dres2.stride(0), C,
                N, C, 1.0 / C, tiles_per_program,
                HAS_DRESIDUAL=dresidual is not None, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=num_warps)
    # No rows: the reduction sums zero partial rows, so dweight and dbias come out as zeros.
    dweight, dbias = _sum_partials(partial, programs if N else 0, weight.dtype)
    return dx, dweight, dbias


def _sum_partials(partial: torch.Tensor, programs: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight, dbias) in `dtype`: sums over the `programs` rows of a contiguous fp32 (2, programs, C)
    partials buffer (programs = 0: zeros, the buffer unread), by one launch of the reduction kernel."""
    C = partial.shape[-1]
    dweight = new_output((C,), dtype, partial.device)
    dbias = new_output((C,), dtype, partial.device)
    with on_device_of(partial):
        _layer_norm_bwd_reduce_kernel[(triton.cdiv(C, REDUCE_BLOCK_C), 2)](
            partial, dweight, dbias, programs, C,
            BLOCK_P=REDUCE_BLOCK_P, BLOCK_C=REDUCE_BLOCK_C, num_warps=REDUCE_WARPS)
    return dweight, dbias


# --------------------------------------------------- torch.library ops and their autograd
# Registered as custom ops so torch.compile treats each launch as one opaque node
# (no graph break) and can trace shapes through the fake implementations.

@kernel_op("layer_norm_fwd")
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    y_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = _forward(x, None, weight, bias, eps, y_dtype)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, y_dtype):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=y_dtype or x.dtype), stats, torch.empty_like(stats)


@kernel_op("add_layer_norm_fwd")
def _add_layer_norm_fwd(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float, y_dtype: torch.dtype | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, new_residual, mean, rstd = _forward(x, residual, weight, bias, eps, y_dtype)
    return new_residual, y, mean, rstd


@_add_layer_norm_fwd.register_fake
def _(residual, x, weight, bias, eps, y_dtype):
    dtype = torch.result_type(residual, x)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=y_dtype or dtype), stats,
            torch.empty_like(stats))


@kernel_op("layer_norm_bwd")
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    dresidual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weight, mean, rstd, dresidual)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, dresidual):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _bias, _eps, _y_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_bwd(dy, x, weight, mean, rstd, None)
    return dx, dweight, dbias, None, None


_layer_norm_fwd.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


def _add_layer_norm_setup(ctx, inputs, output):
    residual, x, weight, _bias, _eps, _y_dtype = inputs
    new_residual, _y, mean, rstd = output
    ctx.save_for_backward(new_residual, weight, mean, rstd)
    ctx.input_dtypes = (residual.dtype, x.dtype)
    ctx.set_materialize_grads(False)


def _add_layer_norm_grad(ctx, dnew_residual, dy, _dmean, _drstd):
    """The new residual feeds two consumers (the next add and this LayerNorm), so its
    gradient is the sum of both: dnew_residual + LayerNorm-backward(dy). residual and x
    entered through a plain add, so both receive that same sum."""
    new_residual, weight, mean, rstd = ctx.saved_tensors
    dweight = dbias = None
    if dy is not None:
        dsum, dweight, dbias = _layer_norm_bwd(dy, new_residual, weight, mean, rstd, dnew_residual)
    elif dnew_residual is not None:
        dsum = dnew_residual
    else:
        return None, None, None, None, None, None
    residual_dtype, x_dtype = ctx.input_dtypes
    return dsum.to(residual_dtype), dsum.to(x_dtype), dweight, dbias, None, None


_add_layer_norm_fwd.register_autograd(_add_layer_norm_grad, setup_context=_add_layer_norm_setup)


# ----------------------------------------------------------------------- public entry points
def autocast_output_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives the matmul after a LayerNorm of x, when it would cast x's
    float32 LayerNorm output down (None otherwise): the kernel then writes that dtype
    directly, sparing a cast kernel and a float32 round trip through memory."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return dtype if dtype in (torch.float16, torch.bfloat16) else None
    return None


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Triton LayerNorm over the last dim, differentiable in x, weight and bias. Output in x's
    dtype, or under autocast in the autocast dtype (see `autocast_output_dtype`)."""
    _check(x, weight, bias, "layer_norm")
    return _layer_norm_fwd(x, weight, bias, float(eps), autocast_output_dtype(x))[0]


def add_layer_norm_triton(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, LayerNorm(residual + x)) in one kernel; both outputs in the promoted dtype,
    except the normed one under autocast (see `autocast_output_dtype`)."""
    _check(x, weight, bias, "add_layer_norm")
    if residual.shape != x.shape or residual.device != x.device:
        raise FastGPTError(f"add_layer_norm: residual {tuple(residual.shape)} on {residual.device} and "
                           f"x {tuple(x.shape)} on {x.device} must match in shape and device")
    # The sum is float32 when either input is (fp16/bf16/fp32 promote that way).
    y_dtype = autocast_output_dtype(x if x.dtype == torch.float32 else residual)
    new_residual, y, _mean, _rstd = _add_layer_norm_fwd(residual, x, weight, bias, float(eps), y_dtype)
    return new_residual, y


# ------------------------------------------------------------------- compile-only check
def compile_specs():
    """The LayerNorm kernels at GPT-2 small (C=768) and XL (C=1600) widths, fp16 and bf16 activations;
    the partials reduction (independent of C) for fp32 (mixed precision), fp16 and bf16 weights."""
    from .compile_check import KernelSpec
    specs = []
    for C in (768, 1600):
        block, warps = _block_and_warps(C)
        block_m, _, bwd_warps = _backward_tile(C)
        for dt in ("fp16", "bf16"):
            for fused in (False, True):
                name = f"layer_norm_fwd{'_add' if fused else ''}[C={C},{dt}]"
                specs.append(KernelSpec(name, _layer_norm_fwd_kernel, {
                    "X": f"*{dt}", "RESIDUAL": f"*{dt}", "W": "*fp32", "B": "*fp32", "Y": f"*{dt}",
                    "RESIDUAL_OUT": f"*{dt}", "MEAN": "*fp32", "RSTD": "*fp32",
                    "stride_x": "i32", "stride_residual": "i32", "stride_y": "i32", "stride_residual_out": "i32",
                    "C": "i32", "inv_C": "fp32", "eps": "fp32", "HAS_RESIDUAL": "constexpr",
                    "BLOCK_C": "constexpr"},
                    {"HAS_RESIDUAL": fused, "BLOCK_C": block}, num_warps=warps))
                name = f"layer_norm_bwd{'_add' if fused else ''}[C={C},{dt}]"
                specs.append(KernelSpec(name, _layer_norm_bwd_kernel, {
                    "X": f"*{dt}", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "DY": f"*{dt}",
                    "DRESIDUAL": f"*{dt}", "DX": f"*{dt}", "PARTIAL": "*fp32",
                    "stride_x": "i32", "stride_dy": "i32", "stride_dresidual": "i32", "stride_dx": "i32",
                    "N": "i32", "C": "i32", "inv_C": "fp32", "tiles_per_program": "i32",
                    "HAS_DRESIDUAL": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr"},
                    {"HAS_DRESIDUAL": fused, "BLOCK_M": block_m, "BLOCK_C": block}, num_warps=bwd_warps))
        # Under autocast: an fp32 residual stream, the normed output (and its gradient) in bf16.
        for fused in (False, True):
            specs.append(KernelSpec(f"layer_norm_fwd{'_add' if fused else ''}[C={C},fp32->bf16]",
                                    _layer_norm_fwd_kernel, {
                "X": "*fp32", "RESIDUAL": "*fp32", "W": "*fp32", "B": "*fp32", "Y": "*bf16",
                "RESIDUAL_OUT": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                "stride_x": "i32", "stride_residual": "i32", "stride_y": "i32", "stride_residual_out": "i32",
                "C": "i32", "inv_C": "fp32", "eps": "fp32", "HAS_RESIDUAL": "constexpr", "BLOCK_C": "constexpr"},
                {"HAS_RESIDUAL": fused, "BLOCK_C": block}, num_warps=warps))
            specs.append(KernelSpec(f"layer_norm_bwd{'_add' if fused else ''}[C={C},bf16 dy->fp32]",
                                    _layer_norm_bwd_kernel, {
                "X": "*fp32", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "DY": "*bf16",
                "DRESIDUAL": "*fp32", "DX": "*fp32", "PARTIAL": "*fp32",
                "stride_x": "i32", "stride_dy": "i32", "stride_dresidual": "i32", "stride_dx": "i32",
                "N": "i32", "C": "i32", "inv_C": "fp32", "tiles_per_program": "i32",
                "HAS_DRESIDUAL": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr"},
                {"HAS_DRESIDUAL": fused, "BLOCK_M": block_m, "BLOCK_C": block}, num_warps=bwd_warps))
    for dt in ("fp32", "fp16", "bf16"):
        specs.append(KernelSpec(f"layer_norm_bwd_reduce[{dt}]", _layer_norm_bwd_reduce_kernel, {
            "PARTIAL": "*fp32", "DW": f"*{dt}", "DB": f"*{dt}", "programs": "i32", "C": "i32",
            "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"},
            {"BLOCK_P": REDUCE_BLOCK_P, "BLOCK_C": REDUCE_BLOCK_C}, num_warps=REDUCE_WARPS))
    return specs
