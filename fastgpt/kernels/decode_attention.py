"""Attention of one new query per sequence against its KV cache (the decode step).

Two implementations with one signature:

* `decode_attention_reference` - einsum over the whole cache, masked past each length.
* `decode_attention_triton`    - flash-decoding in two small Triton kernels.

Why split: a decode step has only B*H queries, far too few programs to fill a
GPU if each (sequence, head) pair were one program walking the whole cache. So
the cache length is cut into chunks; each program reduces one chunk to a
partial softmax state (running max m, denominator l, unnormalised output acc),
and a second kernel merges the chunks exactly: with M = max_c m_c,

    out = sum_c 2^(m_c - M) * acc_c  /  sum_c 2^(m_c - M) * l_c.

The number of chunks depends only on static shapes (B, H, T_max, the GPU), and
`lengths` is read by the kernels only, never on the host: a decode step with
this op can be captured in a CUDA graph. Chunks that start at or past a
sequence's length exit at once, and the merge ignores them. Inference only (no
backward).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._custom_ops import kernel_op, new_output
from .reference import decode_attention_reference  # noqa: F401  (re-exported beside its kernels)

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))


@triton.jit
def _decode_partial_kernel(Q, K, V, LENGTHS, M_PART, L_PART, ACC_PART,
                           stride_qb, stride_qh, stride_qd,
                           stride_kb, stride_kh, stride_kt, stride_kd,
                           stride_vb, stride_vh, stride_vt, stride_vd,
                           H, T_max, chunk, num_splits, sm_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Softmax state (m, l, acc) of one query over cache entries [split*chunk, (split+1)*chunk)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int32 division, int64 offsets
    bh = bh.to(tl.int64)
    length = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), T_max)  # never read past the cache
    start = split * chunk
    if start >= length:  # the sequence ends before this chunk: nothing to do
        return
    end = tl.minimum(start + chunk, length)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    q = q * (sm_scale * LOG2E)  # scores in base 2
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh

    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        mask = ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=mask, other=0.0)
        s = tl.sum(q[None, :] * k.to(tl.float32), axis=1)  # one query: a matrix-vector product
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    part = bh * num_splits + split
    tl.store(M_PART + part + tl.arange(0, 1), m_i)
    tl.store(L_PART + part + tl.arange(0, 1), l_i)
    tl.store(ACC_PART + part * BLOCK_D + offs_d, acc)


@triton.jit
def _decode_merge_kernel(M_PART, L_PART, ACC_PART, LENGTHS, OUT,
                         stride_ob, stride_oh, stride_od,
                         H, chunk, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Exact log-sum-exp merge of the chunks a sequence actually filled."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int32 division, int64 offsets
    bh = bh.to(tl.int64)
    length = tl.load(LENGTHS + b).to(tl.int32)
    used = tl.minimum((length + chunk - 1) // chunk, num_splits)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs_s < used
    part = bh * num_splits + offs_s
    m = tl.load(M_PART + part, mask=ok, other=float("-inf"))
    l_part = tl.load(L_PART + part, mask=ok, other=0.0)
    acc = tl.load(ACC_PART + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(ok, tl.exp2(m - m_max), 0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_part, axis=0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_MAX_SPLITS = 64


def _split_plan(batch_heads: int, max_length: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, chunk, num_splits), from static shapes only (CUDA-graph safe).

    Enough chunks that B*H*num_splits programs cover every SM about twice, each
    chunk a power-of-two multiple of BLOCK_N, at most _MAX_SPLITS chunks.
    """
    if _interpreted() or device.type != "cuda":
        block_n, chunk = 16, 32  # small, so that CPU tests cross tile and chunk boundaries
    else:
        block_n = 64
        programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        splits_wanted = triton.cdiv(programs_wanted, batch_heads)
        chunk = max(block_n, triton.next_power_of_2(triton.cdiv(max_length, splits_wanted)))
    chunk = max(chunk, triton.next_power_of_2(triton.cdiv(max_length, _MAX_SPLITS)))
    return block_n, chunk, triton.cdiv(max_length, chunk)


@kernel_op("decode_attention")
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
    B, H, D = q.shape
    max_length = k_cache.shape[2]
    block_d = triton.next_power_of_2(D)
    block_n, chunk, num_splits = _split_plan(B * H, max_length, q.device)
    # Partials of chunks past a sequence's end stay unwritten (NaN when poisoning): never read.
    m_part = new_output(B * H * num_splits, torch.float32, q.device)
    l_part = new_output(B * H * num_splits, torch.float32, q.device)
    acc_part = new_output((B * H * num_splits, block_d), torch.float32, q.device)
    out = new_output((B, H, D), q.dtype, q.device)
    _decode_partial_kernel[(num_splits, B * H)](
        q, k_cache, v_cache, lengths, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), q.stride(2), *k_cache.stride(), *v_cache.stride(),
        H, max_length, chunk, num_splits, 1.0 / math.sqrt(D),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4)
    _decode_merge_kernel[(B * H,)](
        m_part, l_part, acc_part, lengths, out, *out.stride(), H, chunk, num_splits,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out


@_decode_attention.register_fake
def _(q, k_cache, v_cache, lengths):
    return q.new_empty(q.shape)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            lengths: torch.Tensor) -> torch.Tensor:
    """q: (B, H, D) (may be a strided view); caches: (B, H, T_max, D); lengths: (B,) int64,
    each >= 1. Returns (B, H, D) in q's dtype, softmax and sums in fp32."""
    return _decode_attention(q, k_cache, v_cache, lengths)


def compile_specs():
    """Both kernels at GPT-2 decode shapes (D = 64 and 128, fp16/bf16 caches)."""
    from .compile_check import KernelSpec

    specs = []
    for dtype, ty in (("fp16", "*fp16"), ("bf16", "*bf16")):
        for D in (64, 128):
            strides = {"stride_qb": "i32", "stride_qh": "i32",
                       **{f"stride_{n}{a}": "i32" for n in "kv" for a in "bht"}}
            unit = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1}  # specialised to 1 at run time
            sig = {"Q": ty, "K": ty, "V": ty, "LENGTHS": "*i64", "M_PART": "*fp32", "L_PART": "*fp32",
                   "ACC_PART": "*fp32", **strides, "H": "i32", "T_max": "i32", "chunk": "i32", "num_splits": "i32",
                   "sm_scale": "fp32"}
            specs.append(KernelSpec(f"decode_attention_partial_{dtype}_d{D}", _decode_partial_kernel, sig,
                                    dict(**unit, HEAD_DIM=D, BLOCK_D=D, BLOCK_N=64)))
            sig = {"M_PART": "*fp32", "L_PART": "*fp32", "ACC_PART": "*fp32", "LENGTHS": "*i64", "OUT": ty,
                   "stride_ob": "i32", "stride_oh": "i32", "H": "i32", "chunk": "i32", "num_splits": "i32"}
            specs.append(KernelSpec(f"decode_attention_merge_{dtype}_d{D}", _decode_merge_kernel, sig,
                                    dict(stride_od=1, HEAD_DIM=D, BLOCK_D=D, BLOCK_S=16)))
    return specs
