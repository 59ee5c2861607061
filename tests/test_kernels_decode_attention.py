"""Decode attention (flash-decoding, Triton): one query per sequence against a ragged KV cache.

The ground truth is the last row of full causal attention over each sequence's
own tokens. Output and partial buffers start as NaN (POISON_OUTPUTS), so an
element never written, or a chunk past a sequence's end that the merge wrongly
reads, shows up.
"""
import pytest
import torch
from conftest import DEVICE, GPU, requires_gpu
from kernel_checks import poison_outputs  # noqa: F401  (autouse fixture: outputs start as NaN)

from fastgpt import ops
from fastgpt.kernels.attention import attention_reference
from fastgpt.kernels.decode_attention import _split_plan, decode_attention_reference, decode_attention_triton

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])
# Absolute, on O(1) outputs. fp32: observed at most 2.4e-7 (2 ulps, eps = 1.2e-7) against
# float64 in the interpreter; 8 ulps allowed. fp16: observed 3.8e-4 (the output's rounding).
FP32_EPS = torch.finfo(torch.float32).eps
TOLERANCE = {torch.float32: 8 * FP32_EPS, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def full_attention_last_rows(q_all, k, v, lengths):
    """Row lengths[b]-1 of causal attention over the first lengths[b] tokens, in float64."""
    rows = []
    for b, n in enumerate(lengths.tolist()):
        out = attention_reference(*(t[b:b + 1, :, :n].double() for t in (q_all, k, v)))
        rows.append(out[0, :, n - 1])
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,T_max,D,lengths", [
    (4, 2, 100, 64, [1, 100, 37, 64]),  # T_max not a multiple of the chunk; length 1 and = T_max
    (3, 3, 45, 32, [45, 2, 33]),
    (2, 2, 130, 128, [130, 17]),
    (3, 1, 70, 48, [1, 70, 16]),  # head size that is not a power of two (masked along D)
])
def test_decode_equals_the_last_row_of_full_attention(B, H, T_max, D, lengths, dtype):
    lengths = torch.tensor(lengths, device=DEVICE)
    # queries as the model passes them: q[:, :, 0] of a strided (B, H, 1, D) view
    q_all = torch.randn(B, H, T_max, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, H, T_max, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, H, T_max, D, device=DEVICE, dtype=dtype)
    fused = torch.zeros(B, 1, 3, H, D, device=DEVICE, dtype=dtype)
    fused[:, 0, 0] = q_all[torch.arange(B), :, lengths - 1]
    q = fused[:, :, 0].transpose(1, 2)[:, :, 0]
    assert not q.is_contiguous()
    with ops.use_backend("triton"):
        out = ops.decode_attention(q, k, v, lengths)
    assert out.shape == (B, H, D) and out.dtype == dtype
    expected = full_attention_last_rows(q_all, k, v, lengths)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, lengths), atol=TOLERANCE[dtype], rtol=0)


def test_cache_entries_past_each_length_are_never_read():
    B, H, T_max, D = 3, 2, 90, 64
    lengths = torch.tensor([5, 90, 33], device=DEVICE)
    q = torch.randn(B, H, D, device=DEVICE)
    k, v = torch.randn(2, B, H, T_max, D, device=DEVICE)
    clean = decode_attention_triton(q, k, v, lengths)
    for b, n in enumerate(lengths.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    assert torch.equal(decode_attention_triton(q, k, v, lengths), clean)


@pytest.mark.parametrize("T_max", [1, 31, 32, 100, 1024, 8192, 100_000])
@pytest.mark.parametrize("batch_heads", [1, 12, 192])
def test_split_plan_covers_the_cache_from_static_shapes(T_max, batch_heads):
    block_n, chunk, num_splits = _split_plan(batch_heads, T_max, torch.device(DEVICE))
    assert chunk % block_n == 0
    assert (num_splits - 1) * chunk < T_max <= num_splits * chunk
    assert num_splits <= 64


def test_torch_compile_fullgraph():
    B, H, T_max, D = 2, 2, 40, 32
    q = torch.randn(B, H, D, device=DEVICE)
    k, v = torch.randn(2, B, H, T_max, D, device=DEVICE)
    lengths = torch.tensor([3, 40], device=DEVICE)
    compiled = torch.compile(lambda *a: decode_attention_triton(*a) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lengths), 2 * decode_attention_reference(q, k, v, lengths),
                               atol=16 * FP32_EPS, rtol=0)  # outputs doubled: observed 3.6e-7


@requires_gpu
def test_replays_in_a_cuda_graph_with_lengths_changed_in_place():
    """No host sync: lengths are read on the device, so a captured step follows new lengths."""
    B, H, T_max, D = 4, 12, 1024, 64
    q = torch.randn(B, H, D, device=DEVICE, dtype=torch.float16)
    k, v = torch.randn(2, B, H, T_max, D, device=DEVICE, dtype=torch.float16)
    lengths = torch.tensor([1, 10, 500, 1024], device=DEVICE)
    decode_attention_triton(q, k, v, lengths)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k, v, lengths)
    lengths.copy_(torch.tensor([700, 3, 1024, 64], device=DEVICE))
    graph.replay()
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, lengths), atol=2e-3, rtol=0)
