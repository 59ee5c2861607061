"""Every kernel op under torch.compile's tracing, forward and backward, on any machine.

Eager calls launch the kernels directly; traced calls must go through the registered
custom ops (a Triton launch cannot read a fake tensor). backend="aot_eager" traces the
forward with Dynamo and the backward with AOTAutograd's fake tensors, like inductor
does, but needs no C++/GPU code generation, so it runs here in the interpreter too.
"""
from __future__ import annotations

import torch
from conftest import DEVICE

from fastgpt.kernels.attention import attention_triton
from fastgpt.kernels.cross_entropy import cross_entropy_triton
from fastgpt.kernels.gelu import bias_gelu_triton
from fastgpt.kernels.layernorm import add_layer_norm_triton, layer_norm_triton
from fastgpt.kernels.linear_cross_entropy import linear_cross_entropy_triton


def _block(x, w, b, q, head, targets):
    y = layer_norm_triton(x, w, b)
    residual, y = add_layer_norm_triton(x, y, w, b)
    h = bias_gelu_triton(y, b)
    a = attention_triton(q, q, q).sum()
    return cross_entropy_triton(h, targets) + linear_cross_entropy_triton(residual, head, targets) + a


def test_compiled_forward_and_backward_equal_eager():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 16, generator=gen), 1 + 0.1 * torch.randn(16, generator=gen),
               0.1 * torch.randn(16, generator=gen), torch.randn(1, 2, 8, 16, generator=gen),
               torch.randn(16, 16, generator=gen)]
    targets = torch.randint(0, 16, (6,), generator=gen).to(DEVICE)

    def run(fn):
        leaves = [t.to(DEVICE).requires_grad_() for t in tensors]
        loss = fn(*leaves, targets)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    torch._dynamo.reset()
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = run(compiled)
    loss_e, grads_e = run(_block)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
