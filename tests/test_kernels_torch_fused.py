"""PyTorch's fused kernels, the "auto" path on CPU: the same mathematics as the references."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.kernels import reference, torch_fused


def test_auto_on_cpu_takes_the_fused_kernels_and_torch_the_references():
    x = torch.zeros(2, 3)
    with ops.use_backend("auto"):
        assert ops._implementation("attention", x) is torch_fused.attention_fused
        assert ops._implementation("attention_qkv", x) is torch_fused.attention_qkv_fused
        assert ops._implementation("bias_gelu", x) is torch_fused.bias_gelu_fused
        assert ops._implementation("linear_cross_entropy", x) is torch_fused.linear_cross_entropy_fused
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


@pytest.mark.parametrize("vocab_size,reduction", [(29, "mean"), (29, "sum"), (32, "none"), (None, "mean")])
def test_linear_cross_entropy_fused_over_a_padded_head_against_fp64(vocab_size, reduction):
    """The GEMM runs over the pad rows too; their -inf logits must leave the loss and the
    gradients of the real rows as the fp64 reference's, and the pad rows' gradient exactly 0."""
    N, C, rows = 23, 16, 32
    hidden = torch.randn(N, C, requires_grad=True)
    weight = torch.randn(rows, C)
    if vocab_size is not None:
        weight[vocab_size:] = 0.0  # the model keeps its pad rows zero
    weight.requires_grad_()
    targets = torch.randint(0, vocab_size or rows, (N,))
    targets[3] = -100  # ignored
    loss = torch_fused.linear_cross_entropy_fused(hidden, weight, targets, reduction=reduction,
                                                   vocab_size=vocab_size)
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = F.cross_entropy(h2 @ w2[:vocab_size].t(), targets, reduction=reduction)  # fp64 throughout
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    g = torch.rand_like(loss)
    loss.backward(g)
    expected.backward(g.double())
    torch.testing.assert_close(hidden.grad.double(), h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w2.grad, rtol=1e-5, atol=1e-6)
    if vocab_size is not None:
        assert torch.count_nonzero(weight.grad[vocab_size:]) == 0
    assert torch.isfinite(hidden.grad).all()


def test_linear_cross_entropy_fused_rejects_a_bad_vocab_size_or_reduction():
    hidden, weight, targets = torch.randn(2, 4), torch.randn(8, 4), torch.tensor([0, 1])
    with pytest.raises(FastGPTError, match="vocab_size must be an integer"):
        torch_fused.linear_cross_entropy_fused(hidden, weight, targets, vocab_size=9)
    with pytest.raises(FastGPTError, match="reduction must be mean, sum or none, got 'avg'"):
        torch_fused.linear_cross_entropy_fused(hidden, weight, targets, reduction="avg")


def test_linear_cross_entropy_fused_under_bf16_autocast_matches_autocast_reference():
    """Under autocast the GEMMs run in bf16 as autograd's would; loss and gradients agree with
    the reference under the same autocast to bf16 rounding."""
    N, C, rows, V = 37, 24, 48, 45
    hidden = torch.randn(N, C, requires_grad=True)
    weight = torch.randn(rows, C)
    weight[V:] = 0.0
    weight.requires_grad_()
    targets = torch.randint(0, V, (N,))
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch_fused.linear_cross_entropy_fused(hidden, weight, targets, vocab_size=V)
        expected = reference.linear_cross_entropy_reference(h2, w2, targets, vocab_size=V)
    assert loss.dtype == expected.dtype == torch.float32
    assert "_LinearCrossEntropy" not in type(loss.grad_fn).__name__  # 16-bit logits: autograd's loss
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    loss.backward()
    expected.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=2e-2, atol=2e-3)
    assert torch.count_nonzero(weight.grad[V:]) == 0


def test_linear_cross_entropy_fused_backward_twice_with_retain_graph():
    """The saved gradient is never scaled in place: a second backward gives the same result."""
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    loss = torch_fused.linear_cross_entropy_fused(hidden, weight, torch.randint(0, 16, (9,)))
    assert "_LinearCrossEntropy" in type(loss.grad_fn).__name__  # fp32: the gradient written in the forward
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    hidden.grad = None
    loss.backward()
    torch.testing.assert_close(hidden.grad, first, rtol=0, atol=0)
