"""Float matrices in a layout that CPUs read at full memory bandwidth when decoding.

Decoding one token multiplies a single row vector by every weight matrix, so its
speed is bytes of weights / memory bandwidth. On CPUs PyTorch sends `F.linear(x, W)`
with one row to MKL's GEMV, which streams a matrix too large for the caches at about
half the machine's read bandwidth and on one thread (GPT-2's 50257 x 768 head: 11.5
GB/s with 1 or 2 threads, where `W.sum()` reads 28 GB/s; a 2-core AVX512 EPYC, torch
2.13). The same product split along K into S slabs of W^T, each contiguous,

    W (N, K) -> W^T (K, N) = S slabs (K/S, N),   y = sum_s  x[slab s] @ slab_s,

is one batched GEMM (`bmm`) whose S products run on separate threads, each streaming
its own slab front to back, and a sum of S short rows. Over GPT-2's matrices on the
same machine: 28 GB/s, against 23 for S column blocks (N split instead of K) and 11.5
for `F.linear`. Several rows (a prefill, a served batch) take the same path: S GEMMs
over half the K each. `StreamingLinear` holds that layout;
`stream_matrices` swaps in the streaming layout for the model's matrices (inference
only, like `fastgpt.quantize`): fastgpt's own C kernel (`fastgpt.native_linear`, which
reads at 26-37 GB/s on that machine and runs prefills faster than BLAS) where it builds
with vector code for the CPU, else these slabs, each after timing one pass over the model's own matrices both ways on
the CPU at hand (`streaming_is_faster`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FastGPTError
from .native_linear import NativeLinear, available, bf16_pairs
from .quantize import decode_matrices, freeze, quantize
from .runtime import best_time, resolve_dtype


class StreamingLinear(nn.Module):
    """nn.Linear (inference) with W^T (K, N) stored contiguous, K padded with zero rows to a
    multiple of `splits` so that it cuts into S equal slabs (see the module docstring)."""

    def __init__(self, linear: nn.Linear, splits: int):
        super().__init__()
        if not isinstance(splits, int) or splits < 1:
            raise FastGPTError(f"StreamingLinear: splits must be a positive integer, got {splits!r}")
        N, K = linear.out_features, linear.in_features
        with torch.no_grad():
            weight_t = F.pad(linear.weight.detach().t(), (0, 0, 0, -K % splits)).contiguous()
            self.register_buffer("slabs", weight_t.view(splits, -1, N))        # (S, K_pad / S, N)
            bias = linear.bias
            self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features, self.splits = K, N, splits

    def _product(self, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        M, S, slab = rows.shape[0], self.splits, self.slabs.shape[1]
        if S * slab != self.in_features:
            rows = F.pad(rows, (0, S * slab - self.in_features))
        # (S, M, K/S) @ (S, K/S, N): the S slabs side by side, then their S partial products summed
        y = torch.bmm(rows.view(M, S, slab).transpose(0, 1), self.slabs).sum(0)
        if with_bias and self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (the model fuses fc's bias into its GELU)."""
        return self._product(x, with_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, with_bias=True)

    def weight_t(self) -> torch.Tensor:
        """W^T (K, N): a view of the slabs' real rows (contiguous)."""
        return self.slabs.view(-1, self.out_features)[: self.in_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, splits={self.splits}"


def default_splits() -> int:
    """One slab per torch thread: the batched GEMM hands each thread its own slab."""
    return max(1, torch.get_num_threads())


def streaming_is_faster(linears: list[nn.Linear], streamed: list[nn.Module], repeats: int = 3) -> bool:
    """Whether one decode step's products, every matrix once in order, run faster as
    `streamed` than as `linears` through F.linear: timed here (best of `repeats`), on the
    model's own matrices, so that the caches see what decoding shows them (a model larger
    than the caches streams from memory; a small one may stay cached, where the extra sum
    and thread hand-off per product weigh more). The answer depends on the CPU, its BLAS,
    its caches and the thread count, none of which a flag tells. Measured on a 2-core
    EPYC: GPT-2 124M decoded 1.9x faster streamed, the 4 x 256 demo model 1.4x."""
    rows = [torch.randn(1, linear.in_features, dtype=linear.weight.dtype) for linear in linears]

    def plain():
        for x, linear in zip(rows, linears, strict=True):
            F.linear(x, linear.weight)

    def in_slabs():
        for x, layer in zip(rows, streamed, strict=True):
            layer.matmul_no_bias(x)

    with torch.inference_mode():
        return best_time(in_slabs, repeats) < best_time(plain, repeats)


def _plain_linear(module) -> bool:
    """An nn.Linear computing nn.Linear's product (a subclass such as LoRA adds to it: left alone)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


NATIVE_FORMATS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def stream_matrices(model, splits: int | None = None, check_speed: bool = True, native: bool | None = None) -> str:
    """Swap the nn.Linear matrices of a CPU `model` for a streaming layout, in place
    (inference only: the new layers hold no gradients). Returns a description of what was
    done, "" when nothing was.

    With `native` (default: when fastgpt's C kernel builds here): NativeLinear in the
    model's own format (float32, float16 or bfloat16 weights), and the rest of a 16-bit
    model turned to float32, since the kernel computes in float32 (a 16-bit model then
    keeps its 16-bit weights, with float32 LayerNorms and attention, as llama.cpp does;
    bf16 products on AVX512-BF16 CPUs round their inputs to bf16, see `bf16_pairs`). No
    timing is needed there: decode steps of such a model run all blocks in one C call
    (`fastgpt.native_decode`), which timing the products alone would misjudge; measured end
    to end (README), every format decoded faster this way than on PyTorch's kernels. Where
    the kernel has no vector code for the CPU, `available` says no and the slabs apply.

    Else, float32 only: StreamingLinear with `splits` slabs, when (`check_speed`)
    `streaming_is_faster` says so for this model; other dtypes are left alone there, since
    half-precision batched GEMMs are the slow path of CPU BLAS (fp16 `bmm` measured 10x
    slower than fp16 `F.linear`).

    The token embedding stays for lookups, so a tied LM head gets its own copy (as the
    transposed head copy of `fastgpt.cached_forward` did)."""
    if model.device.type != "cpu":
        return ""
    matrices = [(owner, name) for owner, name in decode_matrices(model) if _plain_linear(getattr(owner, name))]
    dtypes = {getattr(owner, name).weight.dtype for owner, name in matrices}
    if len(dtypes) != 1:
        return ""
    dtype = dtypes.pop()
    fmt = NATIVE_FORMATS.get(dtype)
    if fmt is not None and (available(fmt) if native is None else native):
        model.float()
        streamed = [NativeLinear(getattr(owner, name), fmt) for owner, name in matrices]
        if fmt == "f32":
            done = "float32 matrices in fastgpt's C kernel"
        elif fmt == "bf16" and bf16_pairs():
            done = "bfloat16 weights in fastgpt's C kernel, bf16 dot products (activations rounded at the products)"
        else:
            done = f"{str(dtype).removeprefix('torch.')} weights in fastgpt's C kernel, float32 activations"
    elif dtype == torch.float32:
        linears = [getattr(owner, name) for owner, name in matrices]
        splits = splits or default_splits()
        streamed = [StreamingLinear(linear, splits) for linear in linears]
        if check_speed and not streaming_is_faster(linears, streamed):
            return ""
        done = f"float32 matrices in the streaming layout ({splits} slabs per matrix)"
    else:
        return ""
    for (owner, name), layer in zip(matrices, streamed, strict=True):
        setattr(owner, name, layer)
    freeze(model)
    return done


def decoding_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The weight dtype `fastgpt generate` and `fastgpt serve` load a model in: the runtime's
    choice for inference, warning about bf16 on a CPU without bf16 instructions only where
    PyTorch would multiply it (fastgpt's C kernel widens bf16 weights to fp32 on any CPU)."""
    return resolve_dtype(name, device, "inference", warn=device.type != "cpu" or not available("bf16"))


def prepare_for_decoding(model, quantization: str | None = None, activations: torch.dtype | None = None) -> str:
    """The one step from a loaded model to the form the CLIs decode with, in place:
    quantized when `quantization` ("int8" / "int4"; `activations`: their dtype, default
    the CPU's choice), else, on a CPU, the streaming layout (`stream_matrices`).
    Returns what was done, for the log line."""
    if quantization:
        quantize(model, quantization, activations)
        where = " on fastgpt's C kernel" if isinstance(model.blocks[0].mlp.fc, NativeLinear) else ""
        return f"weights quantized to {quantization}{where} (approximate: logits differ from the float model's)"
    return stream_matrices(model)
