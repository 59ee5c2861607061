"""int8 and int4 weights, for fast decoding on CPUs.

Decoding one sequence reads every weight once per token, so its speed is set by
memory bandwidth / bytes of weights. The formats, and the kernels torch ships for them:

  int8: each matrix row as int8 plus one scale per row (symmetric, absmax / 127):
        4x fewer bytes than float32. Three kernels (`INT8_KERNELS`):
        "native": fastgpt's own C kernel (`fastgpt.native_linear`), fp32 activations,
            exact; it reads GPT-2's int8 matrices at 26-32 GB/s where the two below
            read at 9 and 20 (a 2-core AVX512 EPYC); needs a C compiler at run time;
        "weight-only": ATen's `_weight_int8pack_mm`, activations in bf16 (its fp32
            path measured ~25x slower), exact activations;
        "dynamic": fbgemm's `quantized::linear_dynamic`, fp32 in and out, each
            activation row quantized to int8 on the fly (an extra ~1% error per matmul).
  int4: each run of `group_size` weights along a row as 4-bit codes q in 0..15
        with its own scale and offset, w ~ (q - 8) * scale + zero (asymmetric,
        min/max of the group): ~5-6x fewer bytes than float32 at group size 32. On
        fastgpt's C kernel where it builds (fp32 activations, float32 scale and offset),
        else ATen's `_weight_int4pack_mm_for_cpu` (bf16 scale and zero, bf16 inside: its
        fp32 path measured ~50x slower).

Which kernel and which activation dtype (the dtype of everything between the matmuls:
embeddings, LayerNorms, attention) are chosen from the CPU's capabilities at run time
(`default_int8_kernel`, `activation_dtype`): the native kernel with fp32 activations
wherever it builds; otherwise bf16 only where the CPU computes it natively, elsewhere fp32
activations and, for int8, fbgemm's dynamic kernel.

Both are approximations: each weight moves by up to half a quantization step
(int8: absmax / 254 of its row; int4: (max - min) / 30 of its group, 8x coarser
or worse), so logits change and greedy text can differ from the float model's.
Inference only: the quantized layers hold no gradients.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native_linear
from .errors import FastGPTError
from .native_linear import GROUP, NativeLinear, int8_rows, quantize_groups_int4
from .runtime import CpuCapabilities, cpu_capabilities, resolve_dtype

INT8_KERNELS = ("native", "weight-only", "dynamic")
# The dtype the int4 kernel (and int8's weight-only kernel) computes in: their only fast path.
KERNEL_DTYPE = torch.bfloat16


def activation_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of a quantized model's activations: bf16 on GPUs and on CPUs that compute
    it natively, fp32 elsewhere (emulated bf16 LayerNorms and attention cost more than the
    quantized matmuls save)."""
    return resolve_dtype("auto", torch.device(device), "inference")


def default_int8_kernel(caps: CpuCapabilities | None = None, native: bool | None = None) -> str:
    """'native' where fastgpt's C kernel builds (`native`: default, whether it does here):
    exact fp32 activations, and the fastest measured. Without it, 'weight-only' where bf16
    is native (exact bf16 activations at full speed); elsewhere 'dynamic' when fbgemm is
    built in (it needs only AVX2), since the weight-only kernel would then run either in
    emulated bf16 or on its ~25x slower fp32 path."""
    if native_linear.available("i8") if native is None else native:
        return "native"
    caps = caps or cpu_capabilities()
    if caps.native_bf16 or "fbgemm" not in torch.backends.quantized.supported_engines:
        return "weight-only"
    return "dynamic"


def _fbgemm_pack(qweight: torch.Tensor, scale: torch.Tensor):
    """fbgemm's prepacked form of int8 rows with per-row scales (no bias: it is added apart)."""
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao, not yet removed
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero_points, 0)
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            return torch.ops.quantized.linear_prepack(weight, None)
        finally:
            torch.backends.quantized.engine = previous


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one scale per output row: y = (x @ q.T) * scale + bias.

    `dtype`: the dtype of the scale and bias, and the weight-only kernel's compute dtype.
    `kernel`: "weight-only" or "dynamic" (see the module docstring; `quantize_int8` picks one
    for the CPU at hand).
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16, kernel: str = "weight-only"):
        super().__init__()
        if kernel not in INT8_KERNELS[1:]:  # "native" is NativeLinear's (see quantize_int8)
            raise FastGPTError(f"Int8Linear's kernel must be one of {', '.join(INT8_KERNELS[1:])}, got {kernel!r}")
        if kernel == "dynamic" and (linear.weight.device.type != "cpu"
                                    or "fbgemm" not in torch.backends.quantized.supported_engines):
            raise FastGPTError("the dynamic int8 kernel needs fbgemm on a CPU (x86 with AVX2)")
        qweight, scale = int8_rows(linear.weight)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.to(dtype))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = kernel
        # fbgemm's AVX2 path multiplies pairs of int8 into saturating int16: 7-bit activations avoid
        # overflow there; VNNI accumulates in int32 and can take all 8 bits.
        self.reduce_range = not cpu_capabilities().avx512_vnni
        self.packed = _fbgemm_pack(self.qweight, scale) if kernel == "dynamic" else None

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (the model fuses fc's bias into its GELU)."""
        rows = x.reshape(-1, self.in_features)
        if self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(rows.float().contiguous(), self.packed, self.reduce_range)
        elif rows.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            y = torch.ops.aten._weight_int8pack_mm(rows.to(self.scale.dtype).contiguous(), self.qweight, self.scale)
        else:  # other devices: dequantize (correct, not fast)
            y = F.linear(rows, self.qweight.to(rows.dtype) * self.scale.to(rows.dtype)[:, None])
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul_no_bias(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights ({self.kernel})"


class Int4Linear(nn.Module):
    """nn.Linear with 4-bit weights in groups of `group_size` along each row, each group
    with its own bf16 scale and zero: w = (q - 8) * scale + zero, q in 0..15.

    The codes are stored in ATen's packed CPU layout (two codes per byte); the
    output dimension is padded to a multiple of 16 (the layout's tile) and the
    padding sliced off the result.
    """

    def __init__(self, linear: nn.Linear, group_size: int = 32, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        N, K = linear.out_features, linear.in_features
        if linear.weight.device.type != "cpu":
            raise FastGPTError(f"int4 quantization runs on CPU only (ATen's int4 CPU matmul); the weights are on "
                               f"{linear.weight.device}")
        if group_size not in (32, 64, 128, 256) or K % group_size:
            raise FastGPTError(f"int4 group_size must be 32, 64, 128 or 256 and divide in_features={K}, "
                               f"got {group_size}")
        padded = -N % 16
        weight = F.pad(linear.weight.detach().float(), (0, 0, 0, padded))
        codes, scale, zero = quantize_groups_int4(weight, group_size)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # (K / group_size, N, 2): the layout the matmul reads, scale and zero of each group
        self.register_buffer("scale_zero", torch.stack([scale.T, zero.T], dim=-1).to(dtype).contiguous())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.in_features, self.out_features, self.group_size = K, N, group_size

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (the model fuses fc's bias into its GELU)."""
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != self.scale_zero.dtype:  # the kernel wants activations in the scales' dtype
            rows = rows.to(self.scale_zero.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.packed, self.group_size,
                                                       self.scale_zero)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul_no_bias(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) float32 weight this layer multiplies by, unpacked by the matmul
        itself: the identity times W.T is W.T."""
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero)
        return w_t[:, :self.out_features].T.float()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 weights, group_size={self.group_size}")


QUANTIZATIONS = ("int8", "int4")


def quantize(model, mode: str, dtype: torch.dtype | None = None, group_size: int = 32, kernel: str | None = None):
    """Quantize `model` in place: mode "int8" (quantize_int8) or "int4" (quantize_int4).
    `dtype`: the activations' (default: `activation_dtype` of the model's device)."""
    if mode == "int8":
        return quantize_int8(model, dtype, kernel)
    if mode == "int4":
        return quantize_int4(model, dtype, group_size)
    raise FastGPTError(f"unknown quantization {mode!r} (choose from: {', '.join(QUANTIZATIONS)})")


def decode_matrices(model):
    """(owner, attribute name) of every matrix a decode step multiplies by, the LM head last."""
    for block in model.blocks:
        yield from ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc"), (block.mlp, "proj"))
    yield model, "lm_head"


def _real_rows(model, owner, linear: nn.Linear) -> nn.Linear:
    """The LM head cut to its vocab_size rows (the model stores it padded, see GPTConfig): a quantized
    head neither stores nor computes the pad rows, which are no token. Other matrices as they are."""
    V = model.config.vocab_size
    if owner is not model or linear.out_features == V:
        return linear
    head = nn.Linear(linear.in_features, V, bias=False, device="meta")
    head.weight = nn.Parameter(linear.weight.detach()[:V], requires_grad=False)
    return head


def freeze(model):
    """No gradients for any parameter left: an inference-only model (quantized or streamed)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantize_int4(model, dtype: torch.dtype | None = None, group_size: int = 32, head: str = "int4",
                  native: bool | None = None):
    """Like quantize_int8, but the matrices become group-wise int4: on fastgpt's C kernel
    (NativeLinear "i4", fp32 activations) when `native` (default: where it builds, the group
    size is its 32 and every matrix's K a multiple of it), else Int4Linear, which computes
    in bf16 whatever the activations' dtype.

    `head`: the LM head's format, "int4" (default) or "int8". The head is a third of
    the bytes of the int8 model; measured on GPT-2 124M (1 CPU thread), an int8 head
    decodes ~12% slower than an int4 one and barely reduces the logit error, which
    comes mostly from the blocks. Group sizes 32..128 decode at the same speed; 32 has
    the smallest error.
    """
    if head not in ("int4", "int8"):
        raise FastGPTError(f"quantize_int4: head must be 'int4' or 'int8', got {head!r}")
    matrices = list(decode_matrices(model))
    if native is None:
        native = (model.device.type == "cpu" and group_size == GROUP and native_linear.available("i4")
                  and all(getattr(owner, name).in_features % GROUP == 0 for owner, name in matrices))
    model.to(dtype or (torch.float32 if native else activation_dtype(model.device))).eval()
    for owner, name in matrices:
        linear = _real_rows(model, owner, getattr(owner, name))
        if native:
            layer = NativeLinear(linear, "i8" if owner is model and head == "int8" else "i4")
        elif owner is model and head == "int8":
            layer = Int8Linear(linear, KERNEL_DTYPE, "weight-only")
        else:
            layer = Int4Linear(linear, group_size, KERNEL_DTYPE)
        setattr(owner, name, layer)
    return freeze(model)


def quantize_int8(model, dtype: torch.dtype | None = None, kernel: str | None = None):
    """Turn `model` (a GPT) into an inference-only model with int8 matrices, in place.

    Every projection (qkv, attention out, MLP fc and proj) and the LM head become
    int8 layers (NativeLinear for the "native" kernel, else Int8Linear); the rest
    (embeddings, LayerNorms) and the activations use `dtype` (default: fp32 for the native
    and dynamic kernels, else `activation_dtype`). `kernel`: one of INT8_KERNELS (default:
    `default_int8_kernel()` on CPUs, weight-only elsewhere). The token embedding stays
    unquantized for lookups, so the LM head is no longer tied to it. Returns the model,
    in eval mode.
    """
    on_cpu = model.device.type == "cpu"
    kernel = kernel or (default_int8_kernel() if on_cpu else "weight-only")
    if kernel == "native" and not (on_cpu and native_linear.has_kernel("i8")):
        raise FastGPTError(f"the native int8 kernel runs on CPUs where it builds; here: "
                           f"{native_linear.why_unavailable() if on_cpu else model.device}")
    # fbgemm and the native kernel take fp32 in and out: bf16 activations would only add conversions
    dtype = dtype or (torch.float32 if kernel in ("dynamic", "native") else activation_dtype(model.device))
    # The weight-only kernel's fast path on CPUs is bf16, whatever the activations are.
    compute = KERNEL_DTYPE if on_cpu and kernel == "weight-only" else dtype
    model.to(dtype).eval()
    for owner, name in decode_matrices(model):
        linear = _real_rows(model, owner, getattr(owner, name))
        layer = NativeLinear(linear, "i8") if kernel == "native" else Int8Linear(linear, compute, kernel)
        setattr(owner, name, layer)
    return freeze(model)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every matrix and vector once, one row of
    each embedding, and the whole token embedding again when it is the (tied) LM head
    (an untied head is a matrix among the parameters)."""
    embeddings = {"tok_emb.weight", "pos_emb.weight"}
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        rows_read = 1 if name in embeddings else t.shape[0] if t.dim() else 1
        total += rows_read * (t.numel() // max(t.shape[0], 1) if t.dim() else 1) * t.element_size()
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight:
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total
