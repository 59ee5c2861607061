"""Every transformer block of a decode step (or a speculative verification) in one C call, on CPUs.

A decode step runs ~15 PyTorch calls per block (LayerNorms, four products, the cache
writes, attention, GELU, residual adds). On a small model each costs a few microseconds of
dispatch against microseconds of work: the `make demo` model (4 x 256) spent ~280 us per
block per token, ~10x its arithmetic. `csrc/cpu_decode.c`'s `fastgpt_decode_blocks` runs
all blocks in one OpenMP parallel region, with the same tile products as `NativeLinear`,
and the attention over the live cache written out in C (one token and head per thread at a
time), for up to MAX_TOKENS new tokens of each sequence of a batch, each at its own
position (a ragged batch of the serving engine, through its window of the cache, too).
Every row's result depends on its own sequence only, bit for bit (tested).

`BlockPlan` is the C-side view of a model: the addresses of every block's LayerNorm
vectors and NativeLinear tiles, scales and biases. `plan_for(model)` builds it once per
model when the model fits (CPU, eval, float32 activations, every block matrix a
NativeLinear of one format: see `stream_matrices` and `quantize_int8`), and rebuilds it
when a module or tensor it points at was replaced; otherwise it returns None and the
caller runs the blocks in PyTorch (`fastgpt.cached_forward`, the reference this is tested
against). The plan holds references to the tensors it points at, so they outlive it.
"""
from __future__ import annotations

import ctypes
import weakref

import torch

from . import native_linear
from .kv_cache import KVCache
from .native_linear import NativeLinear

FORMAT_CODES = {"f32": 0, "i8": 1, "bf16": 2, "f16": 3, "i4": 4}
# The most new tokens per call that take the C blocks: its attention is one dot product per
# key and head, fine for a decode step or a speculative verification, slower than PyTorch's
# SDPA for a prompt (GPT-2, 256 tokens: 437 against 328 ms, fp32, 2 threads on the EPYC).
MAX_TOKENS = 16


class _Block(ctypes.Structure):
    """fastgpt_block of csrc/cpu_decode.c."""
    _fields_ = [("ln1_weight", ctypes.c_void_p), ("ln1_bias", ctypes.c_void_p),
                ("ln2_weight", ctypes.c_void_p), ("ln2_bias", ctypes.c_void_p),
                ("matrix", ctypes.c_void_p * 4), ("scale", ctypes.c_void_p * 4), ("bias", ctypes.c_void_p * 4)]


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _holder(module, name: str) -> dict:
    """The dict of `module` that holds attribute `name` (parameters, buffers, submodules or plain)."""
    for table in (module._parameters, module._buffers, module._modules):
        if name in table:
            return table
    return module.__dict__


def _layer_norm_fits(ln, C: int) -> bool:
    weight, bias = getattr(ln, "weight", None), getattr(ln, "bias", None)
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (C,) and t.is_contiguous()
               for t in (weight, bias)) and isinstance(getattr(ln, "eps", None), float)


def _block_parts(block):
    """(ln_1, ln_2, [qkv, attention output, fc, MLP projection]) of a GPT block."""
    return block.ln_1, block.ln_2, [block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj]


class BlockPlan:
    """The blocks of `model` as csrc/cpu_decode.c reads them (see the module docstring)."""

    def __init__(self, model, fmt: str):
        cfg = model.config
        self.C, self.H, self.fmt = cfg.n_embd, cfg.n_head, fmt
        self.eps = model.blocks[0].ln_1.eps
        watched = []  # (owner, attribute, object): what the addresses were taken from
        self.blocks = (_Block * len(model.blocks))()
        for entry, block in zip(self.blocks, model.blocks, strict=True):
            ln_1, ln_2, matrices = _block_parts(block)
            entry.ln1_weight, entry.ln1_bias = ln_1.weight.data_ptr(), ln_1.bias.data_ptr()
            entry.ln2_weight, entry.ln2_bias = ln_2.weight.data_ptr(), ln_2.bias.data_ptr()
            for i, layer in enumerate(matrices):
                entry.matrix[i], entry.scale[i], entry.bias[i] = (layer.tiles.data_ptr(), _pointer(layer.scale),
                                                                  _pointer(layer.bias))
                watched += [(layer, name, getattr(layer, name)) for name in ("tiles", "scale", "bias")]
            for ln in (ln_1, ln_2):
                watched += [(ln, "weight", ln.weight), (ln, "bias", ln.bias)]
            watched += [(block.attn, "qkv", matrices[0]), (block.attn, "proj", matrices[1]),
                        (block.mlp, "fc", matrices[2]), (block.mlp, "proj", matrices[3])]
        # Checked before every step, so by the dict that holds each attribute (nn.Module's
        # __getattr__ costs ~1 us a name: ~100 us per token on the demo model).
        self._watched = [(_holder(owner, name), name, obj) for owner, name, obj in watched]
        self._function = native_linear.kernel_library().fastgpt_decode_blocks
        self._work = torch.empty(0)

    def current(self) -> bool:
        """Whether every module and tensor the addresses came from is still in place."""
        return all(table.get(name) is obj for table, name, obj in self._watched)

    def fits(self, x: torch.Tensor, cache: KVCache, live: int) -> bool:
        """Whether the C blocks take new tokens x (B, T, C) for `cache`, whose sequences reach
        at most `live` positions after them: float32 on the CPU, at most MAX_TOKENS per
        sequence, every position inside the cache, each position's D values contiguous (the
        serving engine's windows of a larger cache qualify)."""
        k, v = cache.k, cache.v
        D = k.shape[-1]
        return (x.dtype == torch.float32 and x.shape[1] <= MAX_TOKENS and k.dtype == torch.float32
                and k.device.type == "cpu" and live <= cache.max_length and k.stride() == v.stride()
                and k.stride(-1) == 1 and k.stride(-2) == D and cache.lengths.dtype == torch.int64)

    def run(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x (B, T, C): T embedded tokens of each sequence b, at positions cache.lengths[b] ..
        + T - 1 -> the last block's output (B, T, C); each block's keys and values are written
        into `cache` at those positions, and each token attends to its own sequence's
        positions up to its own. (The caller checked `fits`.)"""
        x = x.contiguous().clone()
        B, T, _ = x.shape
        positions = cache.lengths.contiguous()
        span = int(positions.max()) + T
        threads = torch.get_num_threads()
        need = 10 * B * T * self.C + threads * span
        if self._work.numel() < need:
            self._work = torch.empty(need)
        layer_stride, batch_stride, head_stride = cache.k.stride()[:3]
        status = self._function(FORMAT_CODES[self.fmt], len(self.blocks), self.blocks, self.C, self.H, B, T,
                                positions.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), layer_stride,
                                batch_stride, head_stride, self.eps, x.data_ptr(), self._work.data_ptr(), threads)
        if status != 0:
            raise RuntimeError(f"fastgpt_decode_blocks failed ({status}) for format {self.fmt}")
        return x


def _plannable_format(model) -> str | None:
    """The one NativeLinear format of every block matrix, or None when the model does not fit."""
    if model.training or model.device.type != "cpu" or not len(model.blocks):
        return None
    C, formats, eps = model.config.n_embd, set(), set()
    for block in model.blocks:
        try:
            ln_1, ln_2, matrices = _block_parts(block)
        except AttributeError:
            return None
        if not all(type(m) is NativeLinear for m in matrices):
            return None
        if not (_layer_norm_fits(ln_1, C) and _layer_norm_fits(ln_2, C)):
            return None
        formats |= {m.fmt for m in matrices}
        eps |= {ln_1.eps, ln_2.eps}
    return formats.pop() if len(formats) == 1 and len(eps) == 1 else None


# model -> its plan; weak keys: a plan lives as long as its model
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(model) -> BlockPlan | None:
    """The model's BlockPlan (built or rebuilt as needed), or None when its blocks do not fit
    or the model is training (the C blocks know no dropout)."""
    if model.training:
        return None
    plan = _PLANS.get(model)
    if plan is not None and plan.current():
        return plan
    if not (len(model.blocks) and type(getattr(model.blocks[0].attn, "qkv", None)) is NativeLinear):
        return None  # the common "no" in one look, before checking every block
    fmt = _plannable_format(model)
    if fmt is None or native_linear.kernel_library() is None:
        _PLANS.pop(model, None)
        return None
    plan = _PLANS[model] = BlockPlan(model, fmt)
    return plan
