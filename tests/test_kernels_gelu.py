"""Triton bias + GELU (tanh) against PyTorch's own tanh GELU in fp64; outputs poisoned with NaN.

The ground truth is `F.gelu(..., approximate="tanh")`, not fastgpt's reference: the
reference shares its constants with the kernel, so a wrong constant in both would pass.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, requires_gpu
from kernel_checks import DTYPES, assert_close, poison_outputs  # noqa: F401 (poison_outputs: autouse fixture)

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.kernels.gelu import bias_gelu_reference, bias_gelu_triton


def gelu_fp64(x, bias):
    return F.gelu(x.double() + bias.double(), approximate="tanh")


def make(rows, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * 3).to(dtype)  # reaches both GELU tails
    bias = torch.randn(width, generator=g).to(dtype)
    dy = torch.randn(rows, width, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (x, bias, dy)]


def run_both(x, bias, dy):
    xt, bt = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y = bias_gelu_triton(xt, bt)
    y.backward(dy)
    xr, br = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    yr = gelu_fp64(xr, br)
    yr.backward(dy.double())
    return (y, xt.grad, bt.grad), (yr, xr.grad, br.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(1, 1), (1, 1000), (7, 1), (7, 31), (7, 768), (333, 31),
                                        (333, 768), (5, 1000)])
def test_bias_gelu_forward_backward(rows, width, dtype):
    x, bias, dy = make(rows, width, dtype)
    (y, dx, dbias), (yr, dxr, dbr) = run_both(x, bias, dy)
    assert y.dtype == dtype and dx.dtype == dtype and dbias.dtype == dtype
    assert_close(y, yr, dtype, "y")
    assert_close(dx, dxr, dtype, "dx")
    assert_close(dbias, dbr, dtype, "dbias")


def test_extreme_inputs_stay_finite_and_exact():
    """Far tails: gelu(u) -> u for large u, -> 0 (and its slope -> 0) for very negative u."""
    x = torch.tensor([[-1e4, -100.0, -10.0, -3.0, 0.0, 3.0, 10.0, 100.0, 1e4]], device=DEVICE)
    bias = torch.zeros(9, device=DEVICE)
    (y, dx, dbias), (yr, dxr, dbr) = run_both(x, bias, torch.ones_like(x))
    assert torch.allclose(y.double(), yr, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dx.double(), dxr, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["column_slice", "transposed"])
def test_non_contiguous_input(layout):
    g = torch.Generator().manual_seed(5)
    C = 40
    if layout == "column_slice":  # views are taken on the device (.to() would make them contiguous)
        x = torch.randn(6, 3 * C, generator=g).to(DEVICE)[:, C:2 * C]
    else:
        x = torch.randn(C, 6, generator=g).to(DEVICE).t()
    bias = torch.randn(C, generator=g).to(DEVICE)
    dy = torch.randn(6, 2 * C, generator=g).to(DEVICE)[:, ::2]
    assert not x.is_contiguous() and not dy.is_contiguous()
    outs, refs = run_both(x, bias, dy)
    for name, a, r in zip(("y", "dx", "dbias"), outs, refs, strict=True):
        assert_close(a, r, torch.float32, name)


def test_three_dim_input_and_dispatch():
    x, bias, _ = make(2 * 5, 24, torch.float32)
    x = x.view(2, 5, 24)
    with ops.use_backend("triton"):
        y = ops.bias_gelu(x, bias)
    assert y.shape == (2, 5, 24)
    assert_close(y, gelu_fp64(x, bias), torch.float32, "y")


def test_reference_is_pytorchs_tanh_gelu():
    x, bias, _ = make(7, 300, torch.float64)
    torch.testing.assert_close(bias_gelu_reference(x, bias), gelu_fp64(x, bias), rtol=1e-14, atol=1e-14)


def test_torch_compile_fullgraph_has_no_graph_break():
    x, bias, _ = make(4, 48, torch.float32)

    def mlp_activation(x, bias):
        return (bias_gelu_triton(x, bias) ** 2).sum()

    compiled = torch.compile(mlp_activation, backend="aot_eager", fullgraph=True)
    xc, bc = x.clone().requires_grad_(), bias.clone().requires_grad_()
    xe, be = x.clone().requires_grad_(), bias.clone().requires_grad_()
    compiled(xc, bc).backward()
    mlp_activation(xe, be).backward()
    assert torch.allclose(xc.grad, xe.grad) and torch.allclose(bc.grad, be.grad)


def test_custom_op_registrations_pass_opcheck():
    x, bias, dy = make(3, 16, torch.float32)
    torch.library.opcheck(torch.ops.fastgpt.bias_gelu_fwd.default,
                          (x.clone().requires_grad_(), bias.clone().requires_grad_()),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastgpt.bias_gelu_bwd.default, (dy, x, bias),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_bias_shape_raises_one_clear_error():
    x, bias, _ = make(2, 8, torch.float32)
    with pytest.raises(FastGPTError, match="bias"):
        bias_gelu_triton(x, bias[:3])


@requires_gpu
def test_gpt2_mlp_shape_bf16_on_gpu():
    x, bias, dy = make(8 * 1024, 3072, torch.bfloat16)
    (y, dx, dbias), (yr, dxr, dbr) = run_both(x, bias, dy)
    assert_close(y, yr, torch.bfloat16, "y")
    assert_close(dx, dxr, torch.bfloat16, "dx")
    assert_close(dbias, dbr, torch.bfloat16, "dbias")
