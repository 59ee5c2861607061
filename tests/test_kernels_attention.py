"""Fused causal attention (Triton) against the textbook reference in float64.

q, k, v are built the way the model builds them: strided (B, H, T, D) views of one
fused (B, T, 3*H*D) projection, so the kernels must honour strides. Every output
buffer starts as NaN (POISON_OUTPUTS), so an element a kernel never writes fails.
Under the CPU interpreter bf16 dots are wrong: bf16 runs on a GPU only.
"""
import math

import pytest
import torch
from conftest import DEVICE, GPU, requires_gpu
from kernel_checks import poison_outputs  # noqa: F401  (autouse fixture: outputs start as NaN)

from fastgpt import ops
from fastgpt.kernels import attention as attention_module
from fastgpt.kernels.attention import attention_qkv_triton, attention_reference, attention_triton
from fastgpt.kernels.reference import attention_qkv_reference

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
# (output, gradient) absolute tolerances against float64; values and grads are O(1) (at most ~5).
# fp32 dots are exact in the interpreter and IEEE on GPU unless TF32 is switched on: observed
# (interpreter, T <= 257) at most 9.5e-7 on outputs and 3.7e-6 on gradients, i.e. 8 and 31
# fp32 ulps (eps = 1.2e-7); the tolerances allow 4x that.
FP32_EPS = torch.finfo(torch.float32).eps
TOLERANCE = {torch.float32: (32 * FP32_EPS, 128 * FP32_EPS), torch.float16: (4e-3, 1.5e-2),
             torch.bfloat16: (3e-2, 8e-2)}


def fused_qkv(B, H, T, D, dtype, requires_grad=True):
    """A (B, T, 3*H*D) projection output and its q, k, v as the model views them."""
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    return qkv, split_heads(qkv, H)


def split_heads(qkv, H):
    B, T, C3 = qkv.shape
    D = C3 // (3 * H)
    return [t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2)]


def reference_fp64(qkv, H, grad_out):
    x = qkv.detach().double().requires_grad_(True)
    out = attention_reference(*split_heads(x, H))
    out.backward(grad_out.double())
    return out, x.grad


def check_triton_against_fp64(B, H, T, D, dtype, atol_out, atol_grad):
    """attention_triton forward and backward on fresh strided q/k/v, within atol of float64."""
    qkv, (q, k, v) = fused_qkv(B, H, T, D, dtype)
    out = attention_triton(q, k, v)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected, expected_grad = reference_fp64(qkv, H, grad_out)
    torch.testing.assert_close(out.double(), expected, atol=atol_out, rtol=0)
    torch.testing.assert_close(qkv.grad.double(), expected_grad, atol=atol_grad, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,T,D", [
    (2, 3, 1, 64), (1, 2, 17, 64), (2, 1, 64, 64), (1, 3, 100, 64), (1, 2, 257, 64),
    (2, 1, 17, 128), (1, 1, 100, 128), (1, 1, 257, 128), (1, 1, 257, 32),
])
def test_forward_and_backward_match_float64_reference(B, H, T, D, dtype):
    qkv, (q, k, v) = fused_qkv(B, H, T, D, dtype)
    assert not q.is_contiguous() and q.stride(-1) == 1  # a strided view, as in the model
    with ops.use_backend("triton"):
        out = ops.attention(q, k, v, dropout_p=0.0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected, expected_grad = reference_fp64(qkv, H, grad_out)
    atol_out, atol_grad = TOLERANCE[dtype]
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=atol_out, rtol=0)
    torch.testing.assert_close(qkv.grad.double(), expected_grad, atol=atol_grad, rtol=0)


@pytest.mark.parametrize("D", [8, 48])
def test_head_dim_that_is_not_a_power_of_two_is_padded(D):
    check_triton_against_fp64(2, 2, 33, D, torch.float32, *TOLERANCE[torch.float32])


def test_saved_log_sum_exp_is_that_of_the_scaled_causal_scores():
    B, H, T, D = 1, 2, 70, 64
    _, (q, k, v) = fused_qkv(B, H, T, D, torch.float32, requires_grad=False)
    out, lse = torch.ops.fastgpt.attention_fwd(q, k, v, 1.0 / math.sqrt(D))
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=16 * FP32_EPS, rtol=0)
    # The output is laid out (B, T, H, D) in memory: merging the heads afterwards is free.
    assert out.transpose(1, 2).is_contiguous()


def test_future_keys_do_not_change_earlier_outputs():
    """Causality, independently of the reference: editing token t's k/v leaves outputs < t alone."""
    qkv, (q, k, v) = fused_qkv(1, 2, 100, 64, torch.float32, requires_grad=False)
    before = attention_triton(q, k, v)
    edited = qkv.clone()
    edited[:, 80:] = 100.0
    after = attention_triton(*split_heads(edited, 2))
    assert torch.equal(before[:, :, :80], after[:, :, :80])
    assert not torch.allclose(before[:, :, 80:], after[:, :, 80:])


def test_backward_saves_nothing_of_size_t_by_t():
    """No T x T buffer: every tensor autograd keeps for the fused backward is O(T * D),
    while the reference keeps (T, T) probabilities (the hook's positive control)."""
    B, H, T, D = 1, 2, 257, 64

    def saved_sizes(attention):
        _, (q, k, v) = fused_qkv(B, H, T, D, torch.float32)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            attention(q, k, v).sum().backward()
        return sizes

    fused = saved_sizes(attention_triton)
    assert fused and max(fused) <= B * T * 3 * H * D  # at most the fused qkv itself
    assert max(saved_sizes(attention_reference)) >= B * H * T * T


def test_fp32_dots_follow_torch_tf32_setting():
    from fastgpt.kernels.attention import _input_precision
    # allow_tf32 is a computed attribute of torch's cuBLAS module (pytest's monkeypatch would
    # try to delete it on undo): set it and restore it by hand.
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _input_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _input_precision(torch.float32) == "tf32"
        assert _input_precision(torch.float16) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_torch_compile_keeps_the_kernels_in_one_graph():
    """Custom ops with fake implementations: fullgraph compilation must not break."""
    qkv, (q, k, v) = fused_qkv(1, 2, 40, 32, torch.float32)

    def step(qkv):
        q, k, v = split_heads(qkv, 2)
        return attention_triton(q, k, v).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(qkv)
    loss.backward()
    x = qkv.detach().double().requires_grad_(True)
    ref = attention_reference(*split_heads(x, 2)).square().sum()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), x.grad, atol=256 * FP32_EPS, rtol=0)  # grads up to 11


@requires_gpu
@pytest.mark.parametrize("D", [64, 128])
def test_bf16_at_gpt2_length_on_gpu(D):
    check_triton_against_fp64(2, 12, 1024, D, torch.bfloat16, atol_out=3e-2, atol_grad=1e-1)


@requires_gpu
def test_peak_memory_at_t4096_is_far_below_a_t_by_t_buffer():
    B, H, T, D = 1, 12, 4096, 64
    qkv, (q, k, v) = fused_qkv(B, H, T, D, torch.bfloat16)
    grad_out = torch.randn(B, H, T, D, device=DEVICE, dtype=torch.bfloat16)
    attention_triton(q, k, v).backward(grad_out)  # compile first
    qkv.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attention_triton(q, k, v).backward(grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    t_by_t = B * H * T * T * 2  # one bf16 score matrix: 384 MiB
    io = qkv.numel() * qkv.element_size()  # q, k, v together: 18 MiB
    # O(T*D): gradients and output of the size of the inputs (42 MiB measured on an H100),
    # nothing of the size of a score matrix
    assert peak < 3 * io and peak < t_by_t / 8, f"peak {peak / 2**20:.1f} MiB"


def test_benchmark_tiny_runs_here_and_gpu_sizes_skip_on_cpu(tmp_path):
    from fastgpt.bench.attention import run
    rows = run(DEVICE, "tiny", tmp_path, backends=("eager", "triton"))
    names = {(r.name, r.backend) for r in rows}
    assert {("attention.fwd", "triton"), ("attention.fwd_bwd", "triton"), ("decode_attention", "triton"),
            ("attention.fwd", "eager")} <= names
    assert all(r.median > 0 for r in rows)
    assert "| attention.fwd |" in (tmp_path / "attention.md").read_text()
    if not GPU:
        assert run("cpu", "gpt2", tmp_path) == []


def test_mismatched_inputs_raise_one_clear_error():
    from fastgpt.errors import FastGPTError
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(FastGPTError, match="one shape and dtype"):
        attention_triton(q, q[:, :, :4], q)
    with pytest.raises(FastGPTError, match="fp32/fp16/bf16"):
        attention_triton(q.double(), q.double(), q.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,T,D", [(2, 3, 1, 64), (1, 2, 100, 64), (2, 1, 70, 32), (1, 2, 33, 24)])
def test_fused_qkv_attention_matches_float64_reference(B, H, T, D, dtype):
    """attention_qkv_triton takes the projection itself and returns d qkv in one piece
    (D=24: the padded split path)."""
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE, dtype=dtype, requires_grad=True)
    out = attention_qkv_triton(qkv, H)
    assert out.shape == (B, T, H * D) and out.dtype == dtype
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    x = qkv.detach().double().requires_grad_(True)
    expected = attention_qkv_reference(x, H)
    expected.backward(grad_out.double())
    atol_out, atol_grad = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol_out, rtol=0)
    torch.testing.assert_close(qkv.grad.double(), x.grad, atol=atol_grad, rtol=0)


@pytest.mark.parametrize("single_launch", [True, False], ids=["one_launch", "two_launches"])
@pytest.mark.parametrize("B,H,T,D", [(1, 2, 100, 64), (2, 1, 70, 32)])
def test_backward_as_one_or_two_launches(B, H, T, D, single_launch, monkeypatch):
    """The backward's two phases (dK/dV, then dQ) in one launch, or in two as on the GPU."""
    monkeypatch.setitem(attention_module._SINGLE_BACKWARD_LAUNCH, "interpreter", single_launch)
    monkeypatch.setitem(attention_module._SINGLE_BACKWARD_LAUNCH, "gpu", single_launch)
    launches = attention_module._backward_launches(D)
    assert [phases for phases, _ in launches] == ([3] if single_launch and not GPU else [1, 2])
    check_triton_against_fp64(B, H, T, D, torch.float32, *TOLERANCE[torch.float32])


def test_fused_qkv_backward_concatenates_nothing():
    """The backward kernel writes dQ, dK, dV into one (B, T, 3C) buffer: no aten.cat (nor any
    copy) runs between the output's gradient and qkv.grad."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    qkv = torch.randn(2, 40, 3 * 2 * 32, device=DEVICE, requires_grad=True)
    out = attention_qkv_triton(qkv, 2)
    with Ops() as ops_seen:
        out.backward(torch.ones_like(out))
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    assert not [name for name in ops_seen.seen if "cat" in name], ops_seen.seen
