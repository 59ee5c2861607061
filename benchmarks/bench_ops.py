"""Each fastgpt op against its eager PyTorch counterpart, through pytest-benchmark.

    pytest benchmarks/ --benchmark-only                         # measure, one table per op and shape
    pytest benchmarks/ --benchmark-only --benchmark-autosave    # keep the run under .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare     # set it against the last saved run

Results are grouped by op, mode and shape (`benchmark.group`), so each table holds the
contenders for one case, on the device at hand (CUDA when visible, else the CPU):
  eager           - PyTorch as people write it (F.layer_norm, F.gelu(..., "tanh"),
                    F.cross_entropy, F.scaled_dot_product_attention, ...);
  fastgpt-triton  - fastgpt's Triton kernel (ops.* under backend "triton"), CUDA only;
  fastgpt-torch   - fastgpt's PyTorch path (ops.* under backend "torch"), what fastgpt
                    runs on a CPU.
On a CPU the Triton kernels run only in the interpreter (numpy, element by element):
its time says nothing about the kernel, so that side is skipped there with that reason,
and the shapes are small. On CUDA the shapes are GPT-2 124M's training shapes in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CUDA = DEVICE == "cuda"
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
# (rows, width, vocab, attention (B, H, T, D), decode (B, H, T_max, D)) on this device
ROWS, WIDTH, VOCAB = (8 * 1024, 768, 50257) if ON_CUDA else (256, 256, 4096)
ATTENTION = (8, 12, 1024, 64) if ON_CUDA else (1, 4, 256, 64)
DECODE = (16, 12, 1024, 64) if ON_CUDA else (2, 4, 512, 64)
IMPLEMENTATIONS = ("eager", "fastgpt-triton", "fastgpt-torch")


@dataclass
class OpCase:
    """One op: its inputs (tensors needing grad first), the eager counterpart, fastgpt's call."""
    name: str
    shape: str
    inputs: Callable[[], tuple[list[torch.Tensor], tuple]]  # (differentiable tensors, other arguments)
    eager: Callable
    fastgpt: Callable
    differentiable: bool = True


def _randn(*shape, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, device=DEVICE)).to(DTYPE)


def _targets(n: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    return torch.randint(0, vocab, (n,), generator=gen, device=DEVICE)


def _norm_params():
    return [1 + _randn(WIDTH, scale=0.1, seed=2), _randn(WIDTH, scale=0.1, seed=3)]


def _eager_add_layer_norm(residual, x, weight, bias):
    new_residual = residual + x
    return new_residual, F.layer_norm(new_residual, (x.shape[-1],), weight, bias, 1e-5)


def _eager_decode(q, k, v, lengths):
    valid = torch.arange(k.shape[2], device=k.device)[None, :] < lengths[:, None]  # (B, T_max)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None, :])
    return out[:, :, 0]


def _qkv():
    B, H, T, D = ATTENTION
    qkv = _randn(B, T, 3, H, D)  # strided views of one fused projection, as the model passes them
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)], ()


def _decode_inputs():
    B, H, T_max, D = DECODE
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    lengths = torch.randint(T_max // 2, T_max + 1, (B,), generator=gen, device=DEVICE)
    return [_randn(B, H, D, seed=5), _randn(B, H, T_max, D, seed=6), _randn(B, H, T_max, D, seed=7)], (lengths,)


B, H, T, D = ATTENTION
CASES = [
    OpCase("layer_norm", f"{ROWS}x{WIDTH}", lambda: ([_randn(ROWS, WIDTH), *_norm_params()], ()),
           lambda x, w, b: F.layer_norm(x, (WIDTH,), w, b, 1e-5), lambda x, w, b: ops.layer_norm(x, w, b, 1e-5)),
    OpCase("add_layer_norm", f"{ROWS}x{WIDTH}",
           lambda: ([_randn(ROWS, WIDTH), _randn(ROWS, WIDTH, seed=9), *_norm_params()], ()),
           _eager_add_layer_norm, lambda r, x, w, b: ops.add_layer_norm(r, x, w, b, 1e-5)),
    OpCase("bias_gelu", f"{ROWS}x{4 * WIDTH}", lambda: ([_randn(ROWS, 4 * WIDTH), _randn(4 * WIDTH, seed=2)], ()),
           lambda x, b: F.gelu(x + b, approximate="tanh"), ops.bias_gelu),
    OpCase("cross_entropy", f"{ROWS}x{VOCAB}", lambda: ([_randn(ROWS, VOCAB, scale=2.0)], (_targets(ROWS, VOCAB),)),
           F.cross_entropy, ops.cross_entropy),
    OpCase("linear_cross_entropy", f"{ROWS}x{WIDTH}x{VOCAB}",
           lambda: ([_randn(ROWS, WIDTH), _randn(VOCAB, WIDTH, scale=0.02, seed=2)], (_targets(ROWS, VOCAB),)),
           lambda h, w, t: F.cross_entropy(h @ w.t(), t), ops.linear_cross_entropy),
    OpCase("attention", f"B={B},H={H},T={T},D={D}", _qkv,
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), ops.attention),
    OpCase("decode_attention", "B={},H={},T_max={},D={},ragged".format(*DECODE), _decode_inputs,
           _eager_decode, ops.decode_attention, differentiable=False),
]
MODES = ("fwd", "fwd+bwd")


def _skip_reason(implementation: str) -> str | None:
    if implementation == "fastgpt-triton" and not ON_CUDA:
        return ("Triton kernels run only in the interpreter on a CPU (numpy emulation): its time says "
                "nothing about the kernel; fastgpt-torch is what fastgpt runs here")
    return None


def _backend(implementation: str):
    """The dispatch backend an implementation runs under (eager code never reaches ops.*)."""
    return ops.use_backend("triton" if implementation == "fastgpt-triton" else "torch")


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_op(benchmark, case: OpCase, mode: str, implementation: str):
    if mode == "fwd+bwd" and not case.differentiable:
        pytest.skip(f"{case.name} is inference-only")
    reason = _skip_reason(implementation)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{case.name} {mode} {case.shape} {str(DTYPE).removeprefix('torch.')} {DEVICE}"
    benchmark.extra_info.update(op=case.name, mode=mode, shape=case.shape, device=DEVICE)
    tensors, others = case.inputs()
    fn = case.eager if implementation == "eager" else case.fastgpt
    if mode == "fwd":
        def step():
            with torch.no_grad(), _backend(implementation):
                out = fn(*tensors, *others)
            _sync()
            return out
    else:
        tensors = [t.detach().requires_grad_() for t in tensors]
        with _backend(implementation):
            grads = [torch.randn_like(o) for o in _as_list(fn(*tensors, *others))]

        def step():
            with _backend(implementation):
                torch.autograd.grad(_as_list(fn(*tensors, *others)), tensors, grads)
            _sync()

    out = benchmark(step)
    if mode == "fwd":  # the contenders compute the same thing: a benchmark of a wrong result is worthless
        tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
        for got, want in zip(_as_list(out), _as_list(case.eager(*tensors, *others)), strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def _as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]
