"""fastgpt's C kernel for CPU decoding (fastgpt.native_linear, csrc/cpu_decode.c, built by
fastgpt.native_build): the product of every weight format against a float64 reference of
the weight it stores, at odd sizes, row counts that cross its 4-row and 64-row blocks and
any thread count; its errors; the build's fallback; and quantized or streamed models
built on it decoding as their references do."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import varied_tiny_model

from fastgpt import native_build, native_linear
from fastgpt.errors import FastGPTError
from fastgpt.generate import generate
from fastgpt.native_linear import FORMATS, GROUP, NativeLinear, int8_rows, pack_tiles, quantize_groups_int4

pytestmark = pytest.mark.skipif(native_build.compiler() is None, reason="no C compiler on this machine")
PROMPTS = [[464], [15496, 11, 995, 0, 314], [40, 1101, 257, 1310, 2099, 286, 262, 2104, 13, 632, 373, 845]]


def stored_weight(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weight as the format stores it, in float64."""
    if fmt == "i8":
        codes, scale = int8_rows(weight)
        return codes.double() * scale.double()[:, None]
    if fmt == "i4":
        codes, scale, zero = (t.double() for t in quantize_groups_int4(weight, GROUP))
        return (codes - 8) * scale.repeat_interleave(GROUP, 1) + zero.repeat_interleave(GROUP, 1)
    return weight.to(FORMATS[fmt]).double()


def test_the_kernel_builds_here():
    assert native_linear.has_kernel("f32"), native_linear.why_unavailable()
    assert native_linear.tile_width() in (16, 32)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("out_features, in_features", [(37, 29), (64, 96), (101, 3), (1, 50), (45, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_every_format_is_the_product_with_its_stored_weight(c_kernel_build, fmt, out_features, in_features, bias):
    if fmt == "i4" and in_features % GROUP:
        with pytest.raises(FastGPTError, match="multiple of 32"):
            NativeLinear(torch.nn.Linear(in_features, out_features), fmt)
        return
    torch.manual_seed(out_features * 7 + in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    layer = NativeLinear(linear, fmt)
    weight = stored_weight(linear.weight, fmt)
    torch.testing.assert_close(layer.weight().double(), weight, rtol=0, atol=1e-7)
    rounds = fmt == "bf16" and native_linear.bf16_pairs()  # bf16 dot products round the activations too
    for rows in [1, 2, 3, 4, 5, 9, 70, 131]:  # 1..4: one pass; 70, 131: across the 64-row blocks
        x = torch.randn(rows, in_features)
        if rounds:
            x = x.bfloat16().float()  # exactly representable: the products are then exact in fp32 sums
        expected = x.double() @ weight.T + (linear.bias.double() if bias else 0)
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (rows, out_features)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * in_features ** 0.5)
        torch.testing.assert_close(layer.matmul_no_bias(x).double(), x.double() @ weight.T,
                                   rtol=1e-5, atol=1e-5 * in_features ** 0.5)


def test_bf16_dot_products_round_the_activations_like_pytorch():
    if not native_linear.bf16_pairs():
        pytest.skip("this build widens bf16 weights (no AVX512-BF16)")
    torch.manual_seed(4)
    linear = torch.nn.Linear(77, 45, bias=False)  # odd K: the pair layout's zero pad
    layer = NativeLinear(linear, "bf16")
    x = torch.randn(6, 77)
    expected = x.bfloat16().double() @ linear.weight.bfloat16().double().T
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_inputs_of_any_layout_and_dtype():
    torch.manual_seed(2)
    linear = torch.nn.Linear(40, 52)
    layer = NativeLinear(linear, "f32")
    strided = torch.randn(40, 10)[:, ::2].t()  # (5, 40), not contiguous
    torch.testing.assert_close(layer(strided), linear(strided), rtol=1e-5, atol=1e-5)
    batched = torch.randn(2, 3, 40)
    torch.testing.assert_close(layer(batched), linear(batched), rtol=1e-5, atol=1e-5)
    half = torch.randn(4, 40).bfloat16()
    out = layer(half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), linear(half.float()), rtol=1e-2, atol=1e-2)
    assert layer(torch.randn(0, 40)).shape == (0, 52)


def test_thread_counts_give_the_same_result():
    torch.manual_seed(3)
    layer = NativeLinear(torch.nn.Linear(96, 300), "i8")
    x = torch.randn(7, 96)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(layer(x))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert torch.equal(other, results[0])  # each output is summed by one thread, in one order


def test_packing_puts_columns_in_tiles():
    weight = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)  # N=5, K=3
    tiles = pack_tiles(weight, 4)
    assert tiles.shape == (2, 3, 4)
    torch.testing.assert_close(tiles[0], weight[:4].T)
    torch.testing.assert_close(tiles[1][:, 0], weight[4])
    assert tiles[1][:, 1:].abs().sum() == 0


def test_bad_use_is_one_clear_error():
    with pytest.raises(FastGPTError, match="format must be one of"):
        NativeLinear(torch.nn.Linear(4, 4), "i3")
    layer = NativeLinear(torch.nn.Linear(8, 8), "f16")
    layer.float()  # converts the fp16 tiles too: refuse instead of reading float32 bits as fp16 ones
    with pytest.raises(FastGPTError, match="converted"):
        layer(torch.randn(1, 8))
    int8 = NativeLinear(torch.nn.Linear(8, 8), "i8")
    int8.half()  # leaves the int8 codes, halves the scales and bias: refused too
    with pytest.raises(FastGPTError, match="converted"):
        int8(torch.randn(1, 8))


def test_a_failed_build_is_reported_and_nothing_is_loaded(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    native_build.load_library.cache_clear()
    try:
        assert native_build.load_library("cpu_decode") is None
        assert "failed" in native_build.unavailable_reason("cpu_decode")
        assert not list((tmp_path / "native").glob("*.so"))  # no half-written library left behind
    finally:
        monkeypatch.undo()
        native_build.load_library.cache_clear()
        native_build._failures.clear()
    assert native_linear.available("f32")


def test_the_build_is_cached_per_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_CACHE", str(tmp_path))
    cc = native_build.compiler()
    path = native_build.library_path("cpu_decode", cc)
    assert path.parent == tmp_path / "native" and path.name.startswith("cpu_decode-")
    assert native_build.library_path("cpu_decode", cc) == path
    from fastgpt import runtime
    other_cpu = runtime.CpuCapabilities(model="another CPU", isa="AVX2", avx2=True, avx512=False,
                                        avx512_bf16=False, avx512_vnni=False, amx=False, f16c=True)
    monkeypatch.setattr(native_build, "cpu_capabilities", lambda: other_cpu)
    assert native_build.library_path("cpu_decode", cc) != path


def _dequantized_copy(model, quantized):
    """`model` with every matrix replaced by what the quantized model multiplies by."""
    reference = copy.deepcopy(model)
    for (owner, name), (q_owner, q_name) in zip(_matrices(reference), _matrices(quantized), strict=True):
        layer = getattr(q_owner, q_name)
        linear = getattr(owner, name)
        with torch.no_grad():
            linear.weight = torch.nn.Parameter(torch.zeros_like(linear.weight))
            linear.weight[:layer.out_features] = layer.weight()
    return reference


def _matrices(model):
    from fastgpt.quantize import decode_matrices
    return list(decode_matrices(model))


def test_an_int8_model_on_the_native_kernel_is_its_dequantized_model():
    from fastgpt.quantize import default_int8_kernel, quantize_int8
    assert default_int8_kernel() == "native"
    model = varied_tiny_model()
    quantized = quantize_int8(copy.deepcopy(model))
    assert isinstance(quantized.lm_head, NativeLinear) and quantized.lm_head.fmt == "i8"
    assert quantized.tok_emb.weight.dtype == torch.float32  # fp32 activations around the kernel
    reference = _dequantized_copy(model, quantized)
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        torch.testing.assert_close(quantized(ids), reference(ids), rtol=1e-4, atol=1e-4)
        assert not torch.equal(quantized(ids), model(ids))  # it is quantized
    assert (generate(quantized, PROMPTS, 10, temperature=0, eos_id=None).tokens
            == generate(reference, PROMPTS, 10, temperature=0, eos_id=None).tokens)


def test_a_float_model_streams_through_the_native_kernel_with_the_same_tokens():
    from fastgpt.streaming_linear import stream_matrices
    model = varied_tiny_model()
    streamed = copy.deepcopy(model)
    assert "C kernel" in stream_matrices(streamed, check_speed=False)
    assert isinstance(streamed.blocks[0].mlp.fc, NativeLinear) and isinstance(streamed.lm_head, NativeLinear)
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        torch.testing.assert_close(streamed(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert (generate(streamed, PROMPTS, 12, temperature=0, eos_id=None).tokens
            == generate(model, PROMPTS, 12, temperature=0, eos_id=None).tokens)
    fc = model.blocks[0].mlp.fc
    x = torch.randn(3, fc.in_features)
    torch.testing.assert_close(streamed.blocks[0].mlp.fc.matmul_no_bias(x), F.linear(x, fc.weight),
                               rtol=1e-5, atol=1e-5)
