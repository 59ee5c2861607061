"""Benchmark: causal attention (prefill/training) and decode attention over a KV cache.

Backends, on the same inputs in the same run:
  eager      - `attention_reference`: scores, mask, softmax, matmul (T x T in memory);
  sdpa_math  - F.scaled_dot_product_attention(is_causal=True), math backend;
  sdpa_flash - the same, FlashAttention backend (CUDA, fp16/bf16 only);
  triton     - fastgpt's fused kernels.
Timed: forward, and forward + backward (median ms, reported as TFLOP/s). FLOPs are
the algorithm's, the same for every backend: the forward's two matmuls are
4*B*H*T*T*D, halved for the causal mask; the backward's five (dV, dP, dQ, dK and the
recomputed QK^T) are 2.5x the forward, so forward + backward = 3.5x forward.

Decode: one query per sequence against a (B, H, T_max, D) cache with ragged lengths
(uniform in [T_max/2, T_max]); eager = `decode_attention_reference` vs triton, as
GB/s of K/V cache actually read (each valid entry once) and microseconds per call.

Memory: peak CUDA memory of forward + backward at T = 4096, against the size of one
T x T score matrix: the fused kernels keep nothing of that size.

Size sets: "gpt2" (CUDA, bf16): B=16, H=12, T=1024, D=64, then T = 512..8192 at
D = 64 and 128 with B*T = 16384 tokens; "tiny" (any device, fp32) is a smoke run
that CI can afford under the Triton interpreter.

    python3 -m fastgpt.bench.attention --device cuda --sizes gpt2 --out benchmarks/results/attention
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime import dtype_name
from .common import (
    Row,
    free_memory,
    markdown_table,
    measure_ms,
    peak_memory_mib,
    start_suite,
    suite_main,
    write_results,
)

BACKENDS = ("eager", "sdpa_math", "sdpa_flash", "triton")
TOKENS = 16 * 1024  # B * T of the GPT-2 training shape, kept constant across the T sweep
SIZE_SETS = {
    "tiny": dict(device="any", dtype=torch.float32, attention=[(1, 2, 64, 32)], decode=[(2, 2, 64, 32)],
                 memory=(1, 2, 128, 32)),
    "gpt2": dict(device="cuda", dtype=torch.bfloat16,
                 attention=[(16, 12, 1024, 64)] + [(TOKENS // T, 12, T, D) for D in (64, 128)
                                                   for T in (512, 1024, 2048, 4096, 8192)
                                                   if (TOKENS // T, D) != (16, 64)],
                 decode=[(1, 12, 1024, 64), (16, 12, 1024, 64), (16, 12, 8192, 64), (16, 12, 4096, 128)],
                 memory=(4, 12, 4096, 64)),
}


def _attention_fn(backend: str):
    from ..kernels.attention import attention_reference, attention_triton
    if backend == "eager":
        return attention_reference
    if backend == "triton":
        return attention_triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kind = SDPBackend.MATH if backend == "sdpa_math" else SDPBackend.FLASH_ATTENTION

    def sdpa(q, k, v):
        with sdpa_kernel(kind):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return sdpa


def _qkv(B, H, T, D, dtype, device):
    """q, k, v as the model passes them: strided views of one fused projection."""
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, generator=gen, device=device).to(dtype)
    return [qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3)]


def _usable(backend: str, device: str, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run here, or None."""
    on_cuda = str(device).startswith("cuda")
    if backend == "sdpa_flash" and (not on_cuda or dtype == torch.float32):
        return "sdpa_flash needs CUDA and fp16/bf16"
    if backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton on CPU needs TRITON_INTERPRET=1 set before Python starts"
    return None


def _tflops(flops: float, med: float, p20: float, p80: float) -> tuple[float, float, float]:
    per_ms = flops / 1e9  # TFLOP/s = flops / (ms * 1e-3) / 1e12
    return per_ms / med, per_ms / p80, per_ms / p20  # slower time -> lower quantile


def _bench_attention(shape, backend, dtype, device, warmup, repeats) -> list[Row]:
    B, H, T, D = shape
    fn = _attention_fn(backend)
    q, k, v = _qkv(B, H, T, D, dtype, device)
    grad = torch.randn(B, H, T, D, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            return fn(q, k, v)

    def forward_backward():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

    fwd_flops = 4 * B * H * T * T * D / 2
    label, dtype_text = f"B={B},H={H},T={T},D={D}", dtype_name(dtype)
    rows = []
    for name, call, flops in (("attention.fwd", forward, fwd_flops),
                              ("attention.fwd_bwd", forward_backward, 3.5 * fwd_flops)):
        med, p20, p80 = measure_ms(call, warmup=warmup, repeats=repeats, device=device)
        rows.append(Row(name, backend, label, dtype_text, *_tflops(flops, med, p20, p80), "TFLOP/s",
                        extra=f"ms={med:.4g}"))
    return rows


def _bench_memory(shape, backend, dtype, device) -> Row | None:
    B, H, T, D = shape
    fn = _attention_fn(backend)
    q, k, v = _qkv(B, H, T, D, dtype, device)
    grad = torch.randn(B, H, T, D, device=device, dtype=dtype)
    peak = peak_memory_mib(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad), device)
    if peak is None:
        return None
    t_by_t = B * H * T * T * q.element_size() / 2**20
    return Row("attention.fwd_bwd.peak_memory", backend, f"B={B},H={H},T={T},D={D}", dtype_name(dtype),
               peak, peak, peak, "MiB", extra=f"one_TxT_scores_MiB={t_by_t:.0f};inputs_excluded")


def _bench_decode(shape, backend, dtype, device, warmup, repeats) -> Row:
    from ..kernels.decode_attention import decode_attention_reference, decode_attention_triton
    B, H, T_max, D = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, D, generator=gen, device=device).to(dtype)
    k = torch.randn(B, H, T_max, D, generator=gen, device=device).to(dtype)
    v = torch.randn(B, H, T_max, D, generator=gen, device=device).to(dtype)
    lengths = torch.randint(T_max // 2, T_max + 1, (B,), generator=gen, device=device)
    fn = decode_attention_triton if backend == "triton" else decode_attention_reference
    med, p20, p80 = measure_ms(lambda: fn(q, k, v, lengths), warmup=warmup, repeats=repeats, device=device)
    nbytes = 2 * int(lengths.sum()) * H * D * k.element_size()  # K and V entries that are valid
    gbps = [nbytes / (t * 1e-3) / 1e9 for t in (med, p80, p20)]
    return Row("decode_attention", backend, f"B={B},H={H},T_max={T_max},D={D},ragged", dtype_name(dtype),
               *gbps, "GB/s", extra=f"us={1e3 * med:.4g};bytes={nbytes}")


def run(device: str = "cuda", sizes: str = "gpt2", out_dir: str | Path | None = None,
        backends: tuple[str, ...] = BACKENDS) -> list[Row]:
    """Run the named size set; write attention.csv / attention.md into out_dir; return the rows.
    A GPU-only size set on CPU, or a backend this device cannot run, is skipped with a message."""
    on_cuda = start_suite("attention", device, sizes, SIZE_SETS, backends, BACKENDS)
    if on_cuda is None:
        return []
    spec = SIZE_SETS[sizes]
    dtype = spec["dtype"]
    usable = []
    for backend in backends:
        reason = _usable(backend, device, dtype)
        if reason:
            print(f"attention: {backend} skipped ({reason})")
        else:
            usable.append(backend)
    warmup, repeats = (25, 100) if on_cuda else (1, 3)
    rows: list[Row] = []
    for shape in spec["attention"]:
        for backend in usable:
            rows += _bench_attention(shape, backend, dtype, device, warmup, repeats)
            free_memory(device)
    for backend in usable:
        row = _bench_memory(spec["memory"], backend, dtype, device)
        if row is not None:
            rows.append(row)
        free_memory(device)
    for shape in spec["decode"]:
        for backend in ("eager", "triton"):
            if backend in usable:
                rows.append(_bench_decode(shape, backend, dtype, device, warmup, repeats))
    if out_dir is not None and rows:
        _write(rows, Path(out_dir))
    return rows


def _write(rows: list[Row], out_dir: Path) -> None:
    text = ("# Attention benchmarks\n\n"
            "TFLOP/s count causal FLOPs (half the square); fwd_bwd = 3.5x fwd FLOPs. "
            "Ratios are against eager, measured in the same run.\n\n"
            + markdown_table(rows, baseline="eager"))
    write_results(rows, out_dir, "attention", text)


def main(argv: list[str] | None = None) -> int:
    def add(parser):
        parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    return suite_main(argv, "attention", __doc__, SIZE_SETS, run, "eager", add,
                      lambda args: {"backends": tuple(args.backends)})

if __name__ == "__main__":
    raise SystemExit(main())
