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

The backward pass is one kernel with two phases per program: phase 1 walks query
tiles for a fixed key/value tile (accumulating dK and dV in registers), phase 2 walks
key/value tiles for a fixed query tile (accumulating dQ). delta_i = sum_d dO_id * O_id
(= sum_j P_ij dP_ij) is recomputed from O and dO where a tile is loaded, so no pre-pass
runs. Under the causal mask every program does the same work. The two phases run as one
launch where they fit in registers together (the interpreter), as two on the GPU, where
together they spill. `attention_qkv_triton` takes the fused (B, T, 3C) projection and
its backward writes dQ, dK, dV straight into one (B, T, 3C) gradient: nothing is
concatenated. Nothing of size T x T is ever stored: memory is O(T * D).

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
def _attn_fwd_kernel(Q, K, V, OUT, LSE,
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
    OUT += b * stride_ob + h * stride_oh

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
    tl.store(OUT + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_dkdv_tile(dk, dv, k, v, Q, OUT, DO, LSE, stride_qt, stride_qd, stride_ot, stride_od,
                        stride_dot, stride_dod, offs_n, offs_d, start_m, T, qk_scale,
                        BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Add one query tile's contribution to dK and dV of a key/value tile (transposed scores).

    delta_i = sum_d dO_id * O_id (= sum_j P_ij dP_ij) is recomputed from the tile's O and dO
    rather than read from a pre-pass: one kernel launch, and no (B, H, T) buffer."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    o = tl.load(OUT + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    # Rows past T: lse = +inf makes their probabilities exactly 0.
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    pT = tl.exp2(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale - lse2[None, :])
    if DIAGONAL:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=INPUT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


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
def _attn_bwd_kernel(Q, K, V, OUT, DO, DQ, DK, DV, LSE,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     stride_dob, stride_doh, stride_dot, stride_dod,
                     stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                     stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                     H, T, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_STREAM: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, PHASES: tl.constexpr = 3):
    """The whole backward pass of one (batch, head) block in one launch, two phases per program:

    1. dK, dV of the BLOCK_OWN keys [j*BLOCK_OWN, ...): walk every query tile that sees them;
    2. dQ of the BLOCK_OWN queries [j*BLOCK_OWN, ...): walk every key tile they see.

    Under the causal mask phase 1 visits the queries after block j and phase 2 the keys
    before it, so every program does the same work (T rows), whatever j is.
    """
    tl.static_assert(BLOCK_OWN % BLOCK_STREAM == 0)  # the diagonal block splits into whole tiles
    start = tl.program_id(0) * BLOCK_OWN
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int32 division, int64 offsets
    bh = bh.to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    OUT += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    LSE += bh * T
    if PHASES & 1:
        _attn_bwd_dkdv_phase(Q, K, V, OUT, DO, DK, DV, LSE, b, h, stride_qt, stride_qd, stride_kt, stride_kd,
                             stride_vt, stride_vd, stride_ot, stride_od, stride_dot, stride_dod,
                             stride_dkb, stride_dkh, stride_dkt, stride_dkd, stride_dvb, stride_dvh, stride_dvt,
                             stride_dvd, start, T, sm_scale, HEAD_DIM, BLOCK_OWN, BLOCK_STREAM, INPUT_PRECISION)
    if PHASES & 2:
        _attn_bwd_dq_phase(Q, K, V, OUT, DO, DQ, LSE, b, h, stride_qt, stride_qd, stride_kt, stride_kd,
                           stride_vt, stride_vd, stride_ot, stride_od, stride_dot, stride_dod,
                           stride_dqb, stride_dqh, stride_dqt, stride_dqd, start, T, sm_scale,
                           HEAD_DIM, BLOCK_OWN, BLOCK_STREAM, INPUT_PRECISION)


@triton.jit
def _attn_bwd_dkdv_phase(Q, K, V, OUT, DO, DK, DV, LSE, b, h, stride_qt, stride_qd, stride_kt, stride_kd,
                         stride_vt, stride_vd, stride_ot, stride_od, stride_dot, stride_dod,
                         stride_dkb, stride_dkh, stride_dkt, stride_dkd, stride_dvb, stride_dvh, stride_dvt,
                         stride_dvd, start, T, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_OWN: tl.constexpr,
                         BLOCK_STREAM: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Phase 1: dK and dV of the BLOCK_OWN keys from `start` (pointers already at this head)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs = start + tl.arange(0, BLOCK_OWN)
    own_ok = offs < T
    qk_scale = sm_scale * LOG2E
    end_diagonal = tl.minimum(start + BLOCK_OWN, T)
    k = tl.load(K + offs[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=own_ok[:, None], other=0.0)
    v = tl.load(V + offs[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=own_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_OWN, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_OWN, HEAD_DIM], dtype=tl.float32)
    for start_m in range(start, end_diagonal, BLOCK_STREAM):  # queries that see only some of these keys
        start_m = tl.multiple_of(start_m, BLOCK_STREAM)
        dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, Q, OUT, DO, LSE, stride_qt, stride_qd, stride_ot, stride_od,
                                     stride_dot, stride_dod, offs, offs_d, start_m, T, qk_scale,
                                     BLOCK_STREAM, True, INPUT_PRECISION)
    for start_m in range(start + BLOCK_OWN, T, BLOCK_STREAM):  # later queries see all of them
        start_m = tl.multiple_of(start_m, BLOCK_STREAM)
        dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, Q, OUT, DO, LSE, stride_qt, stride_qd, stride_ot, stride_od,
                                     stride_dot, stride_dod, offs, offs_d, start_m, T, qk_scale,
                                     BLOCK_STREAM, False, INPUT_PRECISION)
    dk *= sm_scale  # dS was taken w.r.t. the scaled scores
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=own_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=own_ok[:, None])


@triton.jit
def _attn_bwd_dq_phase(Q, K, V, OUT, DO, DQ, LSE, b, h, stride_qt, stride_qd, stride_kt, stride_kd,
                       stride_vt, stride_vd, stride_ot, stride_od, stride_dot, stride_dod,
                       stride_dqb, stride_dqh, stride_dqt, stride_dqd, start, T, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_STREAM: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """Phase 2: dQ of the BLOCK_OWN queries from `start` (pointers already at this head)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs = start + tl.arange(0, BLOCK_OWN)
    own_ok = offs < T
    qk_scale = sm_scale * LOG2E
    end_diagonal = tl.minimum(start + BLOCK_OWN, T)
    # delta of the owned rows first: O is dead before the loop starts.
    o = tl.load(OUT + offs[:, None] * stride_ot + offs_d[None, :] * stride_od, mask=own_ok[:, None], other=0.0)
    do = tl.load(DO + offs[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=own_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    q = tl.load(Q + offs[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=own_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + offs, mask=own_ok, other=float("inf")) * LOG2E
    dq = tl.zeros([BLOCK_OWN, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, start, BLOCK_STREAM):  # keys every owned query sees
        start_n = tl.multiple_of(start_n, BLOCK_STREAM)
        dq = _attn_bwd_dq_tile(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs, offs_d, start_n, T, qk_scale, BLOCK_STREAM, False, INPUT_PRECISION)
    for start_n in range(start, end_diagonal, BLOCK_STREAM):  # the diagonal block: causal mask
        start_n = tl.multiple_of(start_n, BLOCK_STREAM)
        dq = _attn_bwd_dq_tile(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs, offs_d, start_n, T, qk_scale, BLOCK_STREAM, True, INPUT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=own_ok[:, None])


# ----------------------------------------------------------------------------- launch
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tile configs, one row per launch: the interpreter's, then the GPU's for head sizes up to 64
# and up to 128. Each GPU config was compiled for sm_80 and sm_90 (see compile_specs) and
# chosen so that no kernel spills registers, with or without Triton's 16-byte alignment
# specialisation. The interpreter runs small fixed configs: fast on CPU, and still several
# tiles per sequence, so that the tests cross every tile boundary.
#   fwd:  BLOCK_M queries against BLOCK_N-key tiles (at d=128 the accumulator doubles: 64 queries)
#   dkdv: backward phase 1, BLOCK_OWN keys (dK, dV in registers), queries streamed BLOCK_STREAM at a time
#   dq:   backward phase 2, BLOCK_OWN queries (dQ in registers), keys streamed BLOCK_STREAM at a time
_TILES = {  # launch: (interpreter, GPU d <= 64, GPU d <= 128) as (block, block, num_warps, num_stages)
    "fwd": ((64, 32, 4, 1), (128, 64, 8, 3), (64, 64, 8, 2)),
    "dkdv": ((64, 32, 4, 1), (128, 32, 8, 3), (64, 16, 8, 3)),
    "dq": ((64, 32, 4, 1), (128, 32, 8, 3), (64, 32, 8, 2)),
}
_BLOCK_NAMES = {"fwd": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_OWN", "BLOCK_STREAM"),
                "dq": ("BLOCK_OWN", "BLOCK_STREAM")}
# Both backward phases in one launch (PHASES=3) where one config serves both and fits in
# registers; on the GPU the single launch spills (255 registers, 144-180 bytes at d=64 on
# sm_90, where each phase alone needs 213 and 190), so it runs as two launches there.
_SINGLE_BACKWARD_LAUNCH = {"interpreter": True, "gpu": False}


def _config(kernel: str, head_dim: int, gpu: bool | None = None) -> dict:
    """Launch config of `kernel` ("fwd", "dkdv" or "dq"); gpu=None: the GPU's unless interpreting."""
    interpreter, small, large = _TILES[kernel]
    gpu = not _interpreted() if gpu is None else gpu
    first, second, num_warps, num_stages = (small if head_dim <= 64 else large) if gpu else interpreter
    name1, name2 = _BLOCK_NAMES[kernel]
    return {name1: first, name2: second, "num_warps": num_warps, "num_stages": num_stages}


def _backward_launches(head_dim: int) -> list[tuple[int, dict]]:
    """(PHASES, config) of each backward launch: [(3, cfg)] as one launch, else dK/dV then dQ."""
    dkdv, dq = _config("dkdv", head_dim), _config("dq", head_dim)
    if _SINGLE_BACKWARD_LAUNCH["interpreter" if _interpreted() else "gpu"] and dkdv == dq:
        return [(3, dkdv)]
    return [(1, dkdv), (2, dq)]


def _launch_backward(q, k, v, out, do, dq, dk, dv, lse, sm_scale) -> None:
    B, H, T, D = q.shape
    for phases, cfg in _backward_launches(D):
        _attn_bwd_kernel[(triton.cdiv(T, cfg["BLOCK_OWN"]), B * H)](
            q, k, v, out, do, dq, dk, dv, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do),
            *_strides(dq), *_strides(dk), *_strides(dv),
            H, T, sm_scale, HEAD_DIM=D, INPUT_PRECISION=_input_precision(q.dtype), PHASES=phases, **cfg)


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
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k, v, sm_scale)


@_attention_fwd.register_fake
def _(q, k, v, sm_scale):
    B, H, T, D = q.shape
    return _bhtd_like(q), q.new_empty(B, H, T, dtype=torch.float32)


@kernel_op("attention_bwd")
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _bhtd_like(q), _bhtd_like(k), _bhtd_like(v)
    _launch_backward(q, k, v, out, do, dq, dk, dv, lse, sm_scale)
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


# ----------------------------------------------------------------------------- fused qkv input
def _heads(qkv: torch.Tensor, n_head: int) -> list[torch.Tensor]:
    """q, k, v of a (B, T, 3C) projection as strided (B, H, T, D) views (no copy)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    return [t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2)]


def _launch_forward(q, k, v, sm_scale):
    B, H, T, D = q.shape
    out = _bhtd_like(q)
    lse = new_output((B, H, T), torch.float32, q.device)
    cfg = _config("fwd", D)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                           H, T, sm_scale, HEAD_DIM=D, INPUT_PRECISION=_input_precision(q.dtype), **cfg)
    return out, lse


@kernel_op("attention_qkv_fwd")
def _attention_qkv_fwd(qkv: torch.Tensor, n_head: int, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(*_heads(qkv, n_head), sm_scale)


@_attention_qkv_fwd.register_fake
def _(qkv, n_head, sm_scale):
    q = _heads(qkv, n_head)[0]
    B, H, T, D = q.shape
    return _bhtd_like(q), q.new_empty(B, H, T, dtype=torch.float32)


@kernel_op("attention_qkv_bwd")
def _attention_qkv_bwd(do: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, n_head: int,
                       sm_scale: float) -> torch.Tensor:
    """d loss / d qkv, written by the one backward launch straight into a (B, T, 3C) buffer:
    the kernel stores dQ, dK and dV through strided views of it, so nothing is concatenated."""
    dqkv = new_output(qkv.shape, qkv.dtype, qkv.device)
    _launch_backward(*_heads(qkv, n_head), out, do, *_heads(dqkv, n_head), lse, sm_scale)
    return dqkv


@_attention_qkv_bwd.register_fake
def _(do, qkv, out, lse, n_head, sm_scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _qkv_setup_context(ctx, inputs, output):
    qkv, n_head, sm_scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.n_head, ctx.sm_scale = n_head, sm_scale


def _qkv_backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_qkv_bwd(grad_out, qkv, out, lse, ctx.n_head, ctx.sm_scale), None, None


_attention_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


def attention_qkv_triton(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal self-attention of a fused projection: qkv (B, T, 3C) -> (B, T, C); differentiable.

    Its gradient is one (B, T, 3C) tensor from one backward launch, where splitting qkv into
    q, k, v for `attention_triton` would concatenate three gradients. A head size that is not
    a power of two >= 16 takes that split (and padded) path."""
    if qkv.dim() != 3 or qkv.shape[2] % (3 * n_head):
        raise FastGPTError(f"attention: qkv must be (B, T, 3 * C) with C divisible by n_head={n_head}, "
                           f"got {tuple(qkv.shape)}")
    B, T, C3 = qkv.shape
    D = C3 // (3 * n_head)
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    if _padded_head_dim(D) != D or qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return attention_triton(*_heads(qkv, n_head)).transpose(1, 2).reshape(B, T, C3 // 3)
    out, _ = _attention_qkv_fwd(qkv, n_head, 1.0 / math.sqrt(D))
    return out.transpose(1, 2).reshape(B, T, C3 // 3)  # laid out (B, T, H, D): a view


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
                     {"Q": ty, "K": ty, "V": ty, "OUT": ty, "LSE": "*fp32"}, "qkvo", _config("fwd", D, gpu=True),
                     HEAD_DIM=D, INPUT_PRECISION="ieee"),
            ]
            for phase, name in ((1, "dkdv"), (2, "dq")):  # the GPU's two backward launches
                specs.append(spec(
                    f"attention_bwd_{name}_{tag}", _attn_bwd_kernel,
                    {"Q": ty, "K": ty, "V": ty, "OUT": ty, "DO": ty, "DQ": ty, "DK": ty, "DV": ty, "LSE": "*fp32"},
                    ("q", "k", "v", "o", "do", "dq", "dk", "dv"), _config(name, D, gpu=True),
                    HEAD_DIM=D, INPUT_PRECISION="ieee", PHASES=phase))
    return specs
