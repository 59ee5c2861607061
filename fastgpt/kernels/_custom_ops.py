"""Small helpers shared by the Triton kernel wrappers.

* `new_output` allocates a kernel's output. With `POISON_OUTPUTS` on (tests, or
  env FASTGPT_POISON_OUTPUTS=1) the buffer starts as NaN instead of whatever
  memory held before, so an element a kernel forgot to write fails the test
  instead of passing by luck.
* `num_sms` sizes persistent grids (programs that loop over many rows).
* `as_rows` views a tensor as (rows, width) with unit stride along the width,
  copying only when no such view exists.
* `on_device_of` makes a tensor's GPU the current one: Triton launches on the current
  device, which need not be the one holding the tensors.
"""
from __future__ import annotations

import contextlib
import os

import torch

POISON_OUTPUTS = os.environ.get("FASTGPT_POISON_OUTPUTS", "0") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled (integers: -1) tensor when POISON_OUTPUTS is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in elsewhere (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., C) as a 2-D (rows, C) tensor whose last dimension has stride 1.

    A view whenever one exists (e.g. a column slice of a wider tensor keeps its row
    stride, which the kernels take as an argument); otherwise a contiguous copy.
    """
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def on_device_of(x: torch.Tensor):
    """Context manager: launch on x's CUDA device (a no-op for CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
