"""PyTorch's fused kernels, the "auto" path on CPU: the same mathematics as the references."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.kernels import reference, torch_fused


def test_auto_on_cpu_takes_the_fused_kernels_and_torch_the_references():
    x = torch.zeros(2, 3)
    with ops.use_backend("auto"):
        assert ops._implementation("attention", x) is torch_fused.attention_fused
        assert ops._implementation("attention_qkv", x) is torch_fused.attention_qkv_fused
        assert ops._implementation("bias_gelu", x) is torch_fused.bias_gelu_fused
        assert ops._implementation("layer_norm", x) is reference.layer_norm_reference
    with ops.use_backend("torch"):
        assert ops._implementation("attention", x) is reference.attention_reference
        assert ops._implementation("bias_gelu", x) is reference.bias_gelu_reference


def test_bias_gelu_fused_against_fp64_formula():
    x = torch.randn(5, 37, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    y = torch_fused.bias_gelu_fused(x, b)
    u = x.detach().double() + b.detach().double()
    expected = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    torch.testing.assert_close(y.double(), expected, rtol=4e-6, atol=4e-7)
    g = torch.randn_like(y)
    y.backward(g)
    xd = (x.detach().double() + b.detach().double()).requires_grad_()
    F.gelu(xd, approximate="tanh").backward(g.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad.double(), xd.grad.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 17, 64])
def test_attention_fused_against_fp64_reference(T):
    """fp32 in, compared with the written-out reference in fp64 (SDPA's CPU flash kernel
    accumulates in fp32 whatever the input dtype: fp32 tolerances)."""
    B, H, D = 2, 3, 16
    # non-contiguous inputs: slices of a fused projection, as the model makes them
    qkv = torch.randn(B, T, 3 * H * D)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2).requires_grad_() for t in qkv.split(H * D, dim=2))
    out = torch_fused.attention_fused(q, k, v)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = reference.attention_reference(q2, k2, v2)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-6)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g.double())
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_attention_qkv_fused_equals_reference():
    qkv = torch.randn(2, 19, 3 * 32)
    torch.testing.assert_close(torch_fused.attention_qkv_fused(qkv, 4).double(),
                               reference.attention_qkv_reference(qkv.double(), 4), rtol=2e-5, atol=2e-6)
