"""Causal multi-head attention: softmax(Q K^T / sqrt(d) + causal mask) V.

Two implementations with one signature:

* `attention_reference` - the textbook version: builds the (T, T) score matrix.
* `attention_triton`    - fused, flash-style Triton kernels (forward and backward) that never build it.

How the fused forward works (one program = BLOCK_M queries of one head):
the query tile stays in registers while key/value tiles of BLOCK_N rows stream
past it. Softmax is computed *online*: a running row maximum `m` and running
denominator `l` are rescaled whenever a new tile raises the maximum, so the
output accumulator is exact once the last tile has been seen. Causality means a
query tile only visits key tiles up to the diagonal; tiles entirely below the
diagonal need no mask at all, only the diagonal tiles pay for `where`. The
kernel stores the row log-sum-exp (B, H, T) so that the backward pass can
recompute any probability P_ij = exp(S_ij - lse_i) from Q and K alone.

The backward pass first computes delta_i = sum_d dO_id * O_id (= sum_j P_ij dP_ij),
then one kernel walks query tiles for a fixed key/value tile (accumulating dK
and dV in registers), and another walks key/value tiles for a fixed query tile
(accumulating dQ). Nothing of size T x T is ever stored: memory is O(T * D).

Exponentials use exp2 with the scale pre-multiplied by log2(e): exp(x) =
exp2(x * log2 e), and exp2 is the instruction the hardware has.

Attention dropout is not implemented in the kernel: `fastgpt.ops.attention`
sends dropout_p > 0 (training with attention dropout) to the reference path.
fp32 inputs use TF32 tensor-core dots only when PyTorch's
`torch.backends.cuda.matmul.allow_tf32` says so, exactly as torch matmuls do.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import FastGPTError
from ._custom_ops import kernel_op, new_output
from .reference import attention_reference  # noqa: F401  (re-exported beside its kernels)

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))
LN2 = tl.constexpr(0.6931471805599453)  # ln(x) = log2(x) * ln(2)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _attn_fwd_tile(acc, m_i, l_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, offs_d, start_n, T, qk_scale,
                   BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Fold one key/value tile (rows start_n .. start_n + BLOCK_N) into the online softmax."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    if DIAGONAL:  # may run past T, and holds keys in the future of some queries
        k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
    else:  # entirely in the past of every query of the tile: no mask at all
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # log2 domain
    if DIAGONAL:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     H, T, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) -> their outputs and log-sum-exps."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the diagonal block splits into whole key tiles
    # Late query tiles see the most keys: launch them first, so that short ones fill the tail.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    # Divide in int32 (a 64-bit division is a slow subroutine), then widen: B*H*T*D may exceed 2^31.
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    bh = bh.to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

    qk_scale = sm_scale * LOG2E  # softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key tiles strictly below the diagonal block: every key is visible to every query.
    for start_n in range(0, start_m, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, m_i, l_i = _attn_fwd_tile(acc, m_i, l_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                                       offs_m, offs_d, start_n, T, qk_scale,
                                       BLOCK_N, False, INPUT_PRECISION)
    # The diagonal block: the causal mask and the end of the sequence apply.
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, m_i, l_i = _attn_fwd_tile(acc, m_i, l_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                                       offs_m, offs_d, start_n, T, qk_scale,
                                       BLOCK_N, True, INPUT_PRECISION)

    acc = acc / l_i[:, None]
    # Natural-log LSE of the scaled scores: m and log2(l) are in base 2.
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(LSE + bh * T + offs_m, lse, mask=row_ok)
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA,
                           stride_ob, stride_oh, stride_ot, stride_od,
                           stride_dob, stride_doh, stride_dot, stride_dod,
                           H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, which equals sum_j P_ij * dP_ij (needed by dS)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int32 division, int64 offsets
    bh = bh.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                        offs_n, offs_d, start_m, T, qk_scale,
                        BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Add one query tile's contribution to dK and dV of a key/value tile (transposed scores)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    # Rows past T: lse = +inf makes their probabilities exactly 0.
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale - lse2[None, :])
    if DIAGONAL:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=INPUT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_kt, stride_kd,
                          stride_vb, stride_vh, stride_vt, stride_vd,
                          stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                          H, T, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr):
    """One program owns BLOCK_N keys/values and walks every query tile that can see them."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int32 division, int64 offsets
    bh = bh.to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    LSE += bh * T
    DELTA += bh * T

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    # Queries in the diagonal block see only some of these keys: causal mask.
    for start_m in range(start_n, tl.minimum(start_n + BLOCK_N, T), BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                                     offs_n, offs_d, start_m, T, qk_scale, BLOCK_M, True, INPUT_PRECISION)
    # Later queries see all of them.
    for start_m in range(start_n + BLOCK_N, T, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                                     offs_n, offs_d, start_m, T, qk_scale, BLOCK_M, False, INPUT_PRECISION)

    dk *= sm_scale  # dS was taken w.r.t. the scaled scores
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _attn_bwd_dq_tile(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                      offs_m, offs_d, start_n, T, qk_scale,
                      BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Add one key/value tile's contribution to dQ of a query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    if DIAGONAL:
        k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale - lse2[:, None])
    if DIAGONAL:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_kt, stride_kd,
                        stride_vb, stride_vh, stride_vt, stride_vd,
                        stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                        H, T, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        INPUT_PRECISION: tl.constexpr):
    """One program owns BLOCK_M queries and walks every key/value tile they can see."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    # Late query tiles see the most keys: launch them first, so that short ones fill the tail.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int32 division, int64 offsets
    bh = bh.to(tl.int64)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    for start_n in range(0, start_m, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _attn_bwd_dq_tile(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, start_n, T, qk_scale, BLOCK_N, False, INPUT_PRECISION)
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _attn_bwd_dq_tile(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, start_n, T, qk_scale, BLOCK_N, True, INPUT_PRECISION)

    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- launch
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tile configs, one row per kernel: the interpreter's, then the GPU's for head sizes up to 64
# and up to 128. Each GPU config was compiled for sm_80 and sm_90 (see compile_specs) and
# chosen so that no kernel spills registers, with or without Triton's 16-byte alignment
# specialisation. The interpreter runs one small fixed config: fast on CPU, and still
# several tiles per sequence, so that the tests cross every tile boundary.
#   fwd:  BLOCK_M queries against BLOCK_N-key tiles (at d=128 the accumulator doubles: 64 queries)
#   dkdv: BLOCK_N keys owned (dK, dV accumulate in registers), queries streamed BLOCK_M at a time
#   dq:   BLOCK_M queries owned (dQ accumulates in registers), keys streamed BLOCK_N at a time
_TILES = {  # kernel: (interpreter, GPU d <= 64, GPU d <= 128) as (BLOCK_M, BLOCK_N, num_warps, num_stages)
    "fwd": ((64, 32, 4, 1), (128, 64, 8, 3), (64, 64, 8, 2)),
    "dkdv": ((32, 64, 4, 1), (32, 128, 8, 3), (32, 64, 8, 3)),
    "dq": ((64, 32, 4, 1), (128, 32, 8, 3), (64, 32, 8, 2)),
}
_DELTA_BLOCK_M = 32


def _config(kernel: str, head_dim: int, gpu: bool | None = None) -> dict:
    """Launch config of `kernel` ("fwd", "dkdv", "dq"); gpu=None: the GPU's unless interpreting."""
    interpreter, small, large = _TILES[kernel]
    gpu = not _interpreted() if gpu is None else gpu
    block_m, block_n, num_warps, num_stages = (small if head_dim <= 64 else large) if gpu else interpreter
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots run as TF32 on tensor cores only if PyTorch's matmul setting allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _bhtd_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised (NaN when poisoning) (B, H, T, D) tensor laid out as (B, T, H, D) in
    memory, so that the model's `y.transpose(1, 2).reshape(B, T, C)` afterwards is free."""
    B, H, T, D = x.shape
    return new_output((B, T, H, D), x.dtype, x.device).transpose(1, 2)


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


@kernel_op("attention_fwd")
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    out = _bhtd_like(q)
    lse = new_output((B, H, T), torch.float32, q.device)
    cfg = _config("fwd", D)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                           H, T, sm_scale, HEAD_DIM=D, INPUT_PRECISION=_input_precision(q.dtype), **cfg)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, sm_scale):
    B, H, T, D = q.shape
    return _bhtd_like(q), q.new_empty(B, H, T, dtype=torch.float32)


@kernel_op("attention_bwd")
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    kv_cfg, q_cfg = _config("dkdv", D), _config("dq", D)
    precision = _input_precision(q.dtype)
    dq, dk, dv = _bhtd_like(q), _bhtd_like(k), _bhtd_like(v)
    delta = new_output(lse.shape, torch.float32, lse.device)
    _attn_bwd_delta_kernel[(triton.cdiv(T, _DELTA_BLOCK_M), B * H)](out, do, delta, *_strides(out), *_strides(do),
                                                                     H, T, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, kv_cfg["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, T, sm_scale, HEAD_DIM=D, INPUT_PRECISION=precision, **kv_cfg)
    _attn_bwd_dq_kernel[(triton.cdiv(T, q_cfg["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, T, sm_scale, HEAD_DIM=D, INPUT_PRECISION=precision, **q_cfg)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, sm_scale):
    return _bhtd_like(q), _bhtd_like(k), _bhtd_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, sm_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # all O(T * D): no T x T tensor survives the forward
    ctx.sm_scale = sm_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, ctx.sm_scale)
    return dq, dk, dv, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _padded_head_dim(d: int) -> int:
    """Tensor-core dots need a power-of-two tile of at least 16 along D."""
    return max(16, triton.next_power_of_2(d))


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused causal attention, q, k, v: (B, H, T, D) -> (B, H, T, D); differentiable.

    q/k/v may be strided views (e.g. of the model's fused qkv projection): the
    kernels take strides, nothing is copied. A head size that is not a power of
    two >= 16 is zero-padded (zeros change neither q.k nor the kept columns of P V).
    """
    if not (q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise FastGPTError(f"attention: q, k, v must be (B, H, T, D) of one shape and dtype, got "
                           f"{tuple(q.shape)} {q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or q.shape[-1] > 256:
        raise FastGPTError(f"attention: the Triton kernel takes fp32/fp16/bf16 with head size <= 256, "
                           f"got {q.dtype} with head size {q.shape[-1]}")
    D = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(D)
    padded = _padded_head_dim(D)
    if padded != D:
        q, k, v = (F.pad(t, (0, padded - D)) for t in (q, k, v))
    out, _ = _attention_fwd(q, k, v, sm_scale)
    return out[..., :D] if padded != D else out


# ----------------------------------------------------------------------------- compile check
def compile_specs():
    """Every kernel of this module at GPT-2 shapes (D = 64 and 128, fp16/bf16) with its GPU
    config, for the compile-only check (registers, spills, mma/wgmma) of fastgpt.kernels.compile_check."""
    from .compile_check import KernelSpec

    def spec(name, fn, pointers, tensors, config, **constexprs):
        config = dict(config)
        warps, stages = config.pop("num_warps", 4), config.pop("num_stages", 3)
        signature = {**pointers, **{f"stride_{t}{a}": "i32" for t in tensors for a in "bht"}, "H": "i32", "T": "i32"}
        if "sm_scale" in fn.arg_names:
            signature["sm_scale"] = "fp32"
        # At run time Triton specialises the unit stride along D to the constant 1: so do we.
        unit = {f"stride_{t}d": 1 for t in tensors}
        return KernelSpec(name, fn, signature, {**unit, **constexprs, **config}, num_warps=warps, num_stages=stages)

    specs = []
    for dtype, ty in (("fp16", "*fp16"), ("bf16", "*bf16")):
        for D in (64, 128):
            tag = f"{dtype}_d{D}"
            specs += [
                spec(f"attention_fwd_{tag}", _attn_fwd_kernel,
                     {"Q": ty, "K": ty, "V": ty, "O": ty, "LSE": "*fp32"}, "qkvo", _config("fwd", D, gpu=True),
                     HEAD_DIM=D, INPUT_PRECISION="ieee"),
                spec(f"attention_bwd_delta_{tag}", _attn_bwd_delta_kernel,
                     {"O": ty, "DO": ty, "DELTA": "*fp32"}, ("o", "do"), {}, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M),
                spec(f"attention_bwd_dkdv_{tag}", _attn_bwd_dkdv_kernel,
                     {"Q": ty, "K": ty, "V": ty, "DO": ty, "DK": ty, "DV": ty, "LSE": "*fp32", "DELTA": "*fp32"},
                     ("q", "k", "v", "do", "dk", "dv"), _config("dkdv", D, gpu=True), HEAD_DIM=D, INPUT_PRECISION="ieee"),
                spec(f"attention_bwd_dq_{tag}", _attn_bwd_dq_kernel,
                     {"Q": ty, "K": ty, "V": ty, "DO": ty, "DQ": ty, "LSE": "*fp32", "DELTA": "*fp32"},
                     ("q", "k", "v", "do", "dq"), _config("dq", D, gpu=True), HEAD_DIM=D, INPUT_PRECISION="ieee"),
            ]
    return specs
