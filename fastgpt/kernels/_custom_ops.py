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
* `kernel_op` registers a launch function as a `torch.library` custom op, for
  torch.compile, and calls it directly otherwise (see its docstring for why).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

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


class KernelOp:
    """A kernel launch function that is a `torch.library` custom op under torch.compile
    and a plain call (through a `torch.autograd.Function` when it has a backward) in eager.

    Why both: a custom op is an opaque node torch.compile traces through its fake
    implementation without a graph break, but each eager call of one walks several
    Python dispatch layers. Measured on an H100 host (torch 2.11): 190-300 us per call
    for LayerNorm, whose kernel runs 10 us, so eager training was bound by the host.
    The direct path runs the same launch function, with the same setup/backward
    functions registered for both, so the two paths differ only in dispatch.
    """

    def __init__(self, name: str, fn: Callable):
        self.fn = fn
        self.custom = torch.library.custom_op(f"fastgpt::{name}", fn, mutates_args=())
        self._function = None

    def register_fake(self, fake: Callable) -> Callable:
        self.custom.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        self.custom.register_autograd(backward, setup_context=setup_context)

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = self.fn(*args)
                setup_context(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        Function.__name__ = Function.__qualname__ = f"{self.fn.__name__.lstrip('_')}_function"
        self._function = Function

    def __call__(self, *args):
        if _being_traced(args):
            return self.custom(*args)
        if self._function is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self._function.apply(*args)
        return self.fn(*args)


def _being_traced(args) -> bool:
    """torch.compile is tracing this call: Dynamo runs it, or AOTAutograd traces a backward
    with fake/functional tensors (tensor subclasses a Triton launch cannot read)."""
    return torch.compiler.is_compiling() or any(
        isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter) for a in args)


def kernel_op(name: str) -> Callable[[Callable], KernelOp]:
    """Decorator: `@kernel_op("layer_norm_fwd")` makes `fastgpt::layer_norm_fwd` (see KernelOp)."""
    return lambda fn: KernelOp(name, fn)
