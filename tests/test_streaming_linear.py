"""The streaming layout of float matrices (fastgpt.streaming_linear): the same products
as nn.Linear for any row count, output width and split count, and a swapped model that
decodes the same tokens as the plain one."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import varied_tiny_model

from fastgpt.errors import FastGPTError
from fastgpt.generate import generate
from fastgpt.streaming_linear import StreamingLinear, stream_matrices, streaming_is_faster

PROMPTS = [[464], [15496, 11, 995, 0, 314], [40, 1101, 257, 1310, 2099, 286, 262, 2104, 13, 632, 373, 845]]


@pytest.mark.parametrize("splits", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("out_features", [96, 101])
@pytest.mark.parametrize("bias", [True, False])
def test_streaming_linear_is_the_linear_product(splits, out_features, bias):
    torch.manual_seed(splits * 1000 + out_features)
    linear = torch.nn.Linear(50, out_features, bias=bias).double()  # 50: not a multiple of most splits
    layer = StreamingLinear(linear, splits)
    for shape in [(1, 50), (5, 50), (2, 3, 50), (1, 1, 50)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.matmul_no_bias(x), F.linear(x, linear.weight), rtol=1e-12, atol=1e-12)
    assert layer(torch.randn(4, 50, dtype=torch.float64)).is_contiguous()
    torch.testing.assert_close(layer.weight_t(), linear.weight.t())
    if bias:
        torch.testing.assert_close(layer.bias, linear.bias)
    else:
        assert layer.bias is None


def test_streaming_linear_takes_non_contiguous_rows():
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 40)
    layer = StreamingLinear(linear, 2)
    x = torch.randn(32, 6)[:, ::2].t()  # (3, 32), strided
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)


def test_streaming_linear_rejects_a_bad_split_count():
    with pytest.raises(FastGPTError, match="splits"):
        StreamingLinear(torch.nn.Linear(4, 4), 0)


def test_a_streamed_model_decodes_the_same_tokens_as_the_plain_one():
    model = varied_tiny_model()
    streamed = copy.deepcopy(model)
    assert "3 slabs" in stream_matrices(streamed, splits=3, check_speed=False, native=False)
    assert isinstance(streamed.lm_head, StreamingLinear) and isinstance(streamed.blocks[0].mlp.fc, StreamingLinear)
    assert all(not p.requires_grad for p in streamed.parameters())
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        torch.testing.assert_close(streamed(ids), model(ids), rtol=1e-5, atol=1e-5)
    plain = generate(model, PROMPTS, 12, temperature=0, eos_id=None)
    fast = generate(streamed, PROMPTS, 12, temperature=0, eos_id=None)
    assert fast.tokens == plain.tokens
    sampled = [generate(m, PROMPTS[:1], 12, temperature=0.8, top_k=50, seed=7, eos_id=None).tokens
               for m in (model, streamed)]
    assert sampled[0] == sampled[1]


def test_only_float32_cpu_models_are_cut_into_slabs():
    model = varied_tiny_model().half()
    assert not stream_matrices(model, check_speed=False, native=False)
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("slabs_seconds, expected", [(1.0, True), (3.0, False)])
def test_the_speed_check_times_both_layouts_and_follows_the_timing(monkeypatch, slabs_seconds, expected):
    from fastgpt import streaming_linear
    timed = []

    def fake_best_time(fn, repeats=3):
        fn()  # the products really run (shapes checked), then a chosen time
        timed.append(fn.__name__)
        return slabs_seconds if fn.__name__ == "in_slabs" else 2.0
    monkeypatch.setattr(streaming_linear, "best_time", fake_best_time)
    linears = [torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)]
    assert streaming_is_faster(linears, [StreamingLinear(linear, 2) for linear in linears]) is expected
    assert sorted(timed) == ["in_slabs", "plain"]


@pytest.mark.parametrize("faster", [True, False])
def test_the_decoding_form_follows_the_timing_and_quantization_wins(monkeypatch, faster):
    from fastgpt import streaming_linear
    from fastgpt.native_linear import NativeLinear, available
    from fastgpt.quantize import Int8Linear
    monkeypatch.setattr(streaming_linear, "streaming_is_faster", lambda linears, streamed: faster)
    with monkeypatch.context() as without_compiler:  # the slabs, as where the C kernel cannot be built
        without_compiler.setattr(streaming_linear, "available", lambda fmt: False)
        model = varied_tiny_model()
        done = streaming_linear.prepare_for_decoding(model)
        assert isinstance(model.lm_head, StreamingLinear) == faster and ("streaming" in done) == faster
    if available("f32"):  # with it: no timing needed, the C kernel
        model = varied_tiny_model()
        assert "C kernel" in streaming_linear.prepare_for_decoding(model)
        assert isinstance(model.lm_head, NativeLinear)
    quantized = varied_tiny_model()
    assert "int8" in streaming_linear.prepare_for_decoding(quantized, "int8")
    assert isinstance(quantized.lm_head, NativeLinear if available("i8") else Int8Linear)
