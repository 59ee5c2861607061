"""Weight-only int4 quantization (fastgpt.quantize): the packed format round-trips,
the layer is the matmul by its dequantized weight, and a quantized model stays close
to the float one while decoding through the same KV-cache path."""
import copy

import pytest
import torch
from conftest import varied_tiny_model

from fastgpt import native_linear
from fastgpt.errors import FastGPTError
from fastgpt.generate import generate
from fastgpt.kv_cache import KVCache
from fastgpt.model import GPT
from fastgpt.quantize import (
    Int4Linear,
    quantize,
    quantize_groups_int4,
    quantize_int4,
    quantize_int8,
    weight_bytes_per_token,
)

PROMPTS = [[464], [15496, 11, 995, 0, 314], [40, 1101, 257, 1310, 2099, 286, 262, 2104, 13, 632, 373, 845]]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


@pytest.fixture(scope="module")
def model():
    return varied_tiny_model()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_pack_unpack_round_trip(group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 100)  # 100 rows: not a multiple of the packed layout's 16, so padded
    q = Int4Linear(linear, group_size)
    codes, scale, zero = quantize_groups_int4(linear.weight.detach(), group_size)
    assert codes.min() >= 0 and codes.max() <= 15
    # What the packed layer multiplies by is exactly (code - 8) * scale + zero with bf16 scale and zero.
    s = scale.bfloat16().float().repeat_interleave(group_size, dim=1)
    z = zero.bfloat16().float().repeat_interleave(group_size, dim=1)
    unpacked = q.dequantized_weight()
    assert unpacked.shape == linear.weight.shape
    torch.testing.assert_close(unpacked, (codes - 8) * s + z, rtol=1e-2, atol=1e-5)
    # ... and within half a quantization step of the float weight (plus bf16 rounding of scale and zero).
    step = scale.repeat_interleave(group_size, dim=1)
    bf16_rounding = (z.abs() + 8 * s) * 2**-8
    assert ((unpacked - linear.weight).abs() <= step / 2 + bf16_rounding + 1e-6).all()


def test_int4_linear_is_the_dequantized_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 40)
    q = Int4Linear(linear, 32)
    x = torch.randn(3, 7, 128).bfloat16()
    expected = torch.nn.functional.linear(x.float(), q.dequantized_weight(), linear.bias.detach())
    got = q(x)
    assert got.shape == (3, 7, 40) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_int4_rejects_bad_group_sizes():
    with pytest.raises(FastGPTError, match="group_size"):
        Int4Linear(torch.nn.Linear(96, 16), 64)  # 64 does not divide 96
    with pytest.raises(FastGPTError, match="int4"):
        quantize(GPT("tiny"), "int3")


def test_int4_model_stays_close_to_the_float_model():
    """At GPT-2's init scale (std 0.02); the std-0.2 test model is far harsher on 16 levels."""
    torch.manual_seed(0)
    model = GPT("tiny").eval()
    ids = torch.tensor([PROMPTS[2] + PROMPTS[1]])
    with torch.inference_mode():
        exact = model(ids)[0]
        int8 = quantize_int8(copy.deepcopy(model))(ids)[0].float()
        int4 = quantize_int4(copy.deepcopy(model))(ids)[0].float()
    err8, err4 = ((m - exact).norm() / exact.norm() for m in (int8, int4))
    assert err4 < 0.15 and err8 < err4 / 3   # int4's 16 levels per group vs int8's 255 per row
    assert (int4.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.8


def test_int4_decode_steps_through_the_cache_match_the_full_forward_pass(model):
    quantized = quantize_int4(copy.deepcopy(model))
    assert weight_bytes_per_token(quantized) < 0.2 * weight_bytes_per_token(model)
    prompt, text = PROMPTS[2], PROMPTS[2] + [5, 77, 901, 3000, 42, 7, 8, 9]
    cache = KVCache.for_model(quantized, 1, 64)
    with torch.inference_mode():
        hidden = quantized.hidden_states(torch.tensor([prompt]), cache)
        cache.lengths += len(prompt)
        steps = [quantized.lm_head(hidden[:, -1])]
        for token in text[len(prompt):-1]:
            steps.append(quantized.lm_head(quantized.hidden_states(torch.tensor([[token]]), cache)[:, 0]))
            cache.lengths += 1
        stepped = torch.cat(steps).float()
        full = quantized(torch.tensor([text]))[0, len(prompt) - 1:-1].float()
    assert stepped.shape == full.shape
    assert (stepped - full).norm() / full.norm() < 0.03  # bf16 activations: the two paths round differently
    out = generate(quantized, PROMPTS, 16, temperature=0, eos_id=None)
    assert all(len(set(t)) > 5 for t in out.tokens)  # really decoding, not one repeated token


def test_generation_benchmark_takes_one_size_as_a_string_and_measures_int4(tmp_path):
    pytest.importorskip("transformers")
    from fastgpt.bench.generate import run
    rows = run("cpu", sizes="tiny", out_dir=tmp_path, new_tokens=4, prompt_tokens=4, repeats=1,
               dtypes=("int4",), threads=1)
    assert {(r.backend, r.dtype) for r in rows} == {
        ("transformers", "fp32"), ("fastgpt", "int4"), ("bound (bandwidth)", "int4")}
    assert "teacher_forced_top1_agree" in next(r.extra for r in rows if r.backend == "fastgpt")
    assert "| fastgpt | int4 |" in (tmp_path / "generate.md").read_text()


def test_untied_head_is_read_once_per_token_and_quantizes():
    from fastgpt.config import preset
    tied, untied = GPT("tiny").eval(), GPT(preset("tiny", tie_embeddings=False)).eval()
    # either way a decode step reads one embedding row and the whole head matrix
    assert weight_bytes_per_token(untied) == weight_bytes_per_token(tied)
    exact = untied(torch.tensor([PROMPTS[2]]))
    quantized = quantize_int8(copy.deepcopy(untied), torch.float32)
    err = (quantized(torch.tensor([PROMPTS[2]])) - exact).norm() / exact.norm()
    assert err < 0.03  # the untied head was quantized from its own matrix (measured ~0.01)


# ---------------------------------------------------------------------- CPU-aware choices
def _simulate(monkeypatch, native_bf16: bool):
    """Pretend to run on an AVX512-BF16 CPU, or on an AVX2-only one (whatever this machine is)."""
    import dataclasses

    from fastgpt import quantize as quantize_module
    from fastgpt import runtime
    caps = dataclasses.replace(runtime.cpu_capabilities(), avx2=True, avx512=native_bf16, avx512_bf16=native_bf16,
                               avx512_vnni=native_bf16, amx=False)
    monkeypatch.setattr(runtime, "cpu_capabilities", lambda: caps)
    monkeypatch.setattr(quantize_module, "cpu_capabilities", lambda: caps)
    runtime.warn_slow_bf16.cache_clear()
    return caps


@pytest.mark.parametrize("native_bf16", [True, False])
def test_activation_dtype_and_int8_kernel_follow_the_cpu(monkeypatch, native_bf16):
    from fastgpt.quantize import Int8Linear, activation_dtype, default_int8_kernel
    caps = _simulate(monkeypatch, native_bf16)
    monkeypatch.setattr(native_linear, "available", lambda fmt="f32": False)  # the choice without the C kernel
    assert activation_dtype("cpu") == (torch.bfloat16 if native_bf16 else torch.float32)
    has_fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    expected_kernel = "weight-only" if native_bf16 or not has_fbgemm else "dynamic"
    assert default_int8_kernel(caps) == expected_kernel
    torch.manual_seed(0)
    model = quantize_int8(GPT("tiny").eval())
    assert model.tok_emb.weight.dtype == activation_dtype("cpu")
    assert {m.kernel for m in model.modules() if isinstance(m, Int8Linear)} == {expected_kernel}
    # the int4 kernels compute in bf16 inside, but the activations between them follow the CPU
    int4 = quantize_int4(GPT("tiny").eval())
    with torch.inference_mode():
        assert int4(torch.tensor([PROMPTS[2]])).dtype == activation_dtype("cpu")


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="needs fbgemm (x86)")
def test_dynamic_int8_is_the_dequantized_matmul_up_to_activation_rounding():
    from fastgpt.quantize import Int8Linear
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    q = Int8Linear(linear, torch.float32, "dynamic")
    x = torch.randn(3, 5, 256)
    expected = torch.nn.functional.linear(x, q.qweight.float() * q.scale[:, None], linear.bias)
    got = q(x)
    assert got.shape == (3, 5, 96) and got.dtype == torch.float32
    err = ((got - expected).norm() / expected.norm()).item()
    assert 0 < err < 0.02  # activations rounded to 7-8 bits per tensor: not exact, close


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="needs fbgemm (x86)")
def test_dynamic_int8_model_decodes_close_to_the_float_model():
    torch.manual_seed(0)
    model = GPT("tiny").eval()
    ids = torch.tensor([PROMPTS[2] + PROMPTS[1]])
    with torch.inference_mode():
        exact = model(ids)[0]
        dynamic = quantize_int8(copy.deepcopy(model), torch.float32, kernel="dynamic")
        approx = dynamic(ids)[0]
    assert ((approx - exact).norm() / exact.norm()) < 0.05
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    out = generate(dynamic, PROMPTS, 8, temperature=0, eos_id=None)
    assert all(len(t) == 8 for t in out.tokens)
