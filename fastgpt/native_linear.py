"""nn.Linear for decoding on CPUs through fastgpt's own C kernel (`csrc/cpu_decode.c`).

Decoding one token reads every weight once, so its speed is bytes of weights / memory
bandwidth. The kernels PyTorch ships for one-row products stream CPU memory well below
the machine's bandwidth: fp32 `F.linear` at 11.5 GB/s, the int8 kernels at 9
(`_weight_int8pack_mm`) and 20 (fbgemm dynamic) GB/s, where a plain sum reads 32 (a
2-core AVX512 EPYC, torch 2.13). `NativeLinear` stores W^T in tiles of TILE output
columns (32 with AVX-512, 16 with AVX2, 8 in plain C), each K x TILE and contiguous, so
each thread streams its tiles front to back; the kernel widens the stored format to
float32 in registers:

    format  bytes/weight  stored as                        exact?
    f32     4             float32                          yes
    f16     2             float16 (F16C widening)          the weight rounded to fp16
    bf16    2             bfloat16 (a shift)               the weight rounded to bf16 (with
                          AVX512-BF16: pairs of K, bf16    and the activations too:
                          dot products)                    `bf16_pairs`)
    i8      1             int8 + a float32 scale/row       absmax / 127 per output row
    i4      0.5 (+0.25)   4-bit codes, two per byte, + a   (max - min) / 15 per group of
                          scale and offset per group of    32 weights along a row
                          32 along K (float32)

Activations are float32 in and out whatever the format: a 16-bit or int8 model keeps its
LayerNorms, attention and sums in float32, as llama.cpp does. The same kernel serves
prefills and batches (four rows per pass over a tile): on the EPYC above it ran GPT-2's
matrices at 158 GFLOP/s with 256 rows, F.linear at 123. Inference only, CPU only.
`available()` says whether fastgpt uses it by default here: built (see
`fastgpt.native_build`), with vector code for this CPU; `has_kernel()`, whether it is built.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FastGPTError
from .native_build import load_library, unavailable_reason

LIBRARY = "cpu_decode"
FORMATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i8": torch.int8, "i4": torch.uint8}
GROUP = 32  # int4: weights per scale and offset, along K (csrc/cpu_decode.c's GROUP)
_ARGUMENTS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]


def kernel_library(march: str = "native") -> ctypes.CDLL | None:
    """csrc/cpu_decode.c built for this CPU (or `march`), its functions' signatures declared, or None."""
    library = load_library(LIBRARY, march)
    if library is not None and not hasattr(library, "ready"):
        for fmt in FORMATS:
            function = getattr(library, f"fastgpt_gemm_{fmt}", None)
            if function is not None:
                function.argtypes, function.restype = _ARGUMENTS, None
        library.fastgpt_tile_width.restype = ctypes.c_int
        library.fastgpt_vector_width.restype = ctypes.c_int
        library.fastgpt_bf16_pairs.restype = ctypes.c_int
        i64, pointer = ctypes.c_int64, ctypes.c_void_p
        library.fastgpt_decode_blocks.argtypes = [ctypes.c_int, i64, pointer, i64, i64, i64, i64, pointer, pointer,
                                                  pointer, i64, i64, i64, ctypes.c_float, pointer, pointer,
                                                  ctypes.c_int]
        library.fastgpt_decode_blocks.restype = ctypes.c_int
        library.ready = True
    return library


class _Gemms(dict):
    """format -> its ctypes function, looked up once (a module holding one could not be deep-copied)."""

    def __missing__(self, fmt):
        self[fmt] = getattr(kernel_library(), f"fastgpt_gemm_{fmt}")
        return self[fmt]


_GEMMS = _Gemms()


def has_kernel(fmt: str = "f32") -> bool:
    """Whether the kernel library is built here and has a product for weight format `fmt`."""
    library = kernel_library()
    return library is not None and hasattr(library, f"fastgpt_gemm_{fmt}")


def available(fmt: str = "f32") -> bool:
    """Whether fastgpt decodes `fmt` weights with its C kernel by default here: the kernel
    builds, and with vector code for this CPU (AVX-512, or AVX2 with F16C). The plain-C
    build of other CPUs widens narrow formats one element at a time (int8 read at 3.5 GB/s
    on the EPYC, against fbgemm's 20), so there PyTorch's kernels stay the default."""
    return has_kernel(fmt) and kernel_library().fastgpt_vector_width() >= 8


def why_unavailable() -> str:
    return unavailable_reason(LIBRARY) or "the kernel library lacks this format"


def tile_width() -> int:
    library = kernel_library()
    if library is None:
        raise FastGPTError(f"native CPU kernels unavailable: {why_unavailable()}")
    return library.fastgpt_tile_width()


def bf16_pairs() -> bool:
    """Whether this build multiplies bf16 weights with bf16 dot products (AVX512-BF16): its
    bf16 tiles then hold pairs of K, and its bf16 products round the activations to bf16
    (as oneDNN's bf16 matmuls do), at twice the fp32 arithmetic rate for prompts and batches."""
    library = kernel_library()
    return library is not None and bool(library.fastgpt_bf16_pairs())


def pack_bf16_pairs(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, K) -> (ceil(N / tile), ceil(K / 2), tile, 2) bf16: each column's weights for K steps
    2p and 2p + 1 side by side, the layout of a bf16 dot product (K padded with a zero)."""
    weight = F.pad(weight.to(torch.bfloat16), (0, weight.shape[1] % 2))
    tiles = pack_tiles(weight, tile)                                   # (T, K_even, tile)
    return tiles.view(tiles.shape[0], -1, 2, tile).transpose(2, 3).contiguous()


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 codes (N, K) and float32 scales (N,), weight ~ codes * scale[:, None]:
    symmetric, one scale per output row (absmax / 127)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


def quantize_groups_int4(weight: torch.Tensor, group_size: int):
    """(N, K) float -> codes (N, K) int32 in 0..15, scale and zero (N, K / group_size) float32,
    so that weight ~ (codes - 8) * scale + zero, each group spanning its own [min, max]."""
    N, K = weight.shape
    groups = weight.detach().float().reshape(N, K // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = low + 8 * scale
    return codes.to(torch.int32).reshape(N, K), scale, zero


def pack_int4(weight: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> tiles (ceil(N / tile), K, tile / 2) uint8, byte j = code of column j
    (low nibble) | code of column j + tile / 2 (high nibble); and params
    (ceil(N / tile), K / GROUP, 2, tile) float32: each group's scale row, then its offset
    row (zero - 8 scale), so that w = code * scale + offset."""
    codes, scale, zero = quantize_groups_int4(weight, GROUP)
    tiles = pack_tiles(codes.to(torch.uint8), tile)
    tiles = tiles[..., : tile // 2] | (tiles[..., tile // 2:] << 4)
    by_tile = [pack_tiles(t, tile) for t in (scale, zero - 8 * scale)]  # each (T, K / GROUP, tile)
    return tiles.contiguous(), torch.stack(by_tile, dim=2).contiguous()


def pack_tiles(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, K) -> (ceil(N / tile), K, tile), contiguous; the last tile padded with zero columns."""
    N, K = weight.shape
    padded = F.pad(weight, (0, 0, 0, -N % tile))
    return padded.view(-1, tile, K).transpose(1, 2).contiguous()


class NativeLinear(nn.Module):
    """nn.Linear (inference, CPU) with its weight in `fmt` ("f32", "f16", "bf16", "i8", "i4") in the
    tile layout of csrc/cpu_decode.c; float32 arithmetic (see the module docstring)."""

    def __init__(self, linear: nn.Linear, fmt: str = "f32"):
        super().__init__()
        if fmt not in FORMATS:
            raise FastGPTError(f"NativeLinear: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if linear.weight.device.type != "cpu":
            raise FastGPTError(f"NativeLinear runs on CPUs; the weight is on {linear.weight.device}")
        if not has_kernel(fmt):
            raise FastGPTError(f"native CPU kernel for {fmt} unavailable: {why_unavailable()}")
        weight = linear.weight.detach()
        if fmt == "i4" and linear.in_features % GROUP:
            raise FastGPTError(f"NativeLinear i4: in_features ({linear.in_features}) must be a multiple of {GROUP}")
        with torch.no_grad():
            if fmt == "i4":
                tiles, scale = pack_int4(weight, tile_width())
            elif fmt == "i8":
                codes, scale = int8_rows(weight)
                tiles = pack_tiles(codes, tile_width())
            elif fmt == "bf16" and bf16_pairs():
                tiles, scale = pack_bf16_pairs(weight, tile_width()), None
            else:
                tiles, scale = pack_tiles(weight.to(FORMATS[fmt]), tile_width()), None
            self.register_buffer("tiles", tiles)
            self.register_buffer("scale", scale)
            bias = linear.bias
            self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt

    def _product(self, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
        # Decoding calls this ~50 times per token: the common case (fp32, contiguous) costs
        # one allocation and the call; anything else is converted first.
        if x.device.type != "cpu":
            raise FastGPTError(f"NativeLinear runs on CPUs; the input is on {x.device}")
        tiles, scale, bias = self.tiles, self.scale, self.bias
        if (tiles.dtype != FORMATS[self.fmt] or (scale is not None and scale.dtype != torch.float32)
                or (bias is not None and bias.dtype != torch.float32)):
            raise FastGPTError(f"NativeLinear's {self.fmt} tiles, scales or bias were converted (by .to(), .half() "
                               "or .bfloat16()?); the kernel reads them as they were stored: rebuild the layer")
        rows = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        N = self.out_features
        y = torch.empty(*x.shape[:-1], N)
        M = y.numel() // N if N else 0
        if M:
            bias = bias if with_bias else None
            _GEMMS[self.fmt](rows.data_ptr(), M, self.in_features, self.in_features, tiles.data_ptr(), N,
                           None if scale is None else scale.data_ptr(), None if bias is None else bias.data_ptr(),
                           y.data_ptr(), N, torch.get_num_threads())
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (the model fuses fc's bias into its GELU)."""
        return self._product(x, with_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, with_bias=True)

    def weight(self) -> torch.Tensor:
        """The (N, K) float32 weight this layer multiplies by (codes times scales for i8 and i4)."""
        K, N = self.in_features, self.out_features
        if self.fmt == "i4":
            codes = torch.cat([self.tiles & 0x0F, self.tiles >> 4], dim=-1).float()  # (T, K, tile)
            scale, offset = (self.scale[:, :, i].repeat_interleave(GROUP, dim=1) for i in (0, 1))  # (T, K, tile)
            return (codes * scale + offset).transpose(1, 2).reshape(-1, K)[:N]
        tiles = self.tiles
        if tiles.dim() == 4:  # bf16 pairs of K: back to (T, K, tile)
            tiles = tiles.transpose(2, 3).reshape(tiles.shape[0], -1, tiles.shape[2])[:, :K]
        w = tiles.float().transpose(1, 2).reshape(-1, K)[:N]
        return w * self.scale[:, None] if self.scale is not None else w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights {self.fmt} (native)"
