"""All blocks of a one-token decode step in one C call (fastgpt.native_decode,
csrc/cpu_decode.c): the same hidden states, cache contents and greedy tokens as the PyTorch
blocks of fastgpt.cached_forward over the same NativeLinear weights, for every weight
format and at every position up to a full cache; the plan follows replaced modules and
steps aside for models and batches it does not cover."""
import copy

import pytest
import torch
from conftest import varied_tiny_model

from fastgpt import native_build, native_decode
from fastgpt.cached_forward import hidden_states_at
from fastgpt.generate import generate
from fastgpt.kv_cache import KVCache
from fastgpt.native_linear import NativeLinear
from fastgpt.quantize import quantize_int4, quantize_int8
from fastgpt.streaming_linear import stream_matrices

pytestmark = pytest.mark.skipif(native_build.compiler() is None, reason="no C compiler on this machine")
PROMPTS = [[15496, 11, 995, 0, 314], [40, 1101, 257, 1310, 2099, 286, 262, 2104, 13, 632, 373, 845]]


def native_model(fmt: str, **overrides):
    model = varied_tiny_model(**overrides)
    if fmt == "i8":
        return quantize_int8(model, kernel="native")
    if fmt == "i4":
        return quantize_int4(model, native=True)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[fmt]
    assert "C kernel" in stream_matrices(model.to(dtype), native=True)
    return model


def decode_both_ways(model, tokens, chunk: int = 1):
    """Feed `tokens`, `chunk` at a time, through hidden_states_at with the C plan and without
    it (monkeypatched away), from two fresh caches: (hidden states, caches) of both."""
    results = []
    for use_plan in (True, False):
        cache = KVCache.for_model(model, 1)
        states = []
        original = native_decode.plan_for
        if not use_plan:
            native_decode.plan_for = lambda m: None
        try:
            with torch.inference_mode():
                for start in range(0, len(tokens), chunk):
                    piece = tokens[start:start + chunk]
                    states.append(hidden_states_at(model, torch.tensor([piece]), cache))
                    cache.lengths += len(piece)
        finally:
            native_decode.plan_for = original
        results.append((torch.cat(states, dim=1), cache))
    return results


@pytest.mark.parametrize("fmt", ["f32", "i8", "f16", "bf16", "i4"])
def test_the_c_blocks_are_the_pytorch_blocks(c_kernel_build, fmt):
    model = native_model(fmt)
    assert native_decode.plan_for(model) is not None and native_decode.plan_for(model).fmt == fmt
    torch.manual_seed(5)
    tokens = torch.randint(0, model.config.vocab_size, (model.config.context_length,)).tolist()  # fills the cache
    (fast, fast_cache), (reference, reference_cache) = decode_both_ways(model, tokens)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, reference, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(fast_cache.k, reference_cache.k, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(fast_cache.v, reference_cache.v, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fmt", ["f32", "i8"])
@pytest.mark.parametrize("chunk", [2, 5, 13])
def test_several_new_tokens_in_one_call_attend_causally(c_kernel_build, fmt, chunk):
    """A speculative verification's shape: several new tokens of one sequence per call, each
    attending to the cache and to the new tokens before it; the last chunk fills the cache."""
    model = native_model(fmt)
    torch.manual_seed(6)
    tokens = torch.randint(0, model.config.vocab_size, (model.config.context_length,)).tolist()
    (fast, fast_cache), (reference, reference_cache) = decode_both_ways(model, tokens, chunk)
    torch.testing.assert_close(fast, reference, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(fast_cache.k, reference_cache.k, rtol=2e-5, atol=2e-5)
    (one_at_a_time, _), _ = decode_both_ways(model, tokens)
    torch.testing.assert_close(fast, one_at_a_time, rtol=2e-5, atol=2e-5)
    plan, cache = native_decode.plan_for(model), KVCache.for_model(model, 1)
    many = torch.zeros(1, native_decode.MAX_TOKENS + 1, model.config.n_embd)
    assert plan.fits(many[:, :-1], cache, 20) and not plan.fits(many, cache, 20)  # longer runs: PyTorch blocks
    assert not plan.fits(many[:, :-1], cache, cache.max_length + 1)  # past the cache: never written by C


def test_odd_widths_and_head_sizes(c_kernel_build):
    model = native_model("f32", n_embd=40, n_head=5, n_layer=3)  # head_dim 8: the vector loops' scalar tails
    tokens = [3, 17, 250, 9, 1000, 42, 7]
    (fast, _), (reference, _) = decode_both_ways(model, tokens)
    torch.testing.assert_close(fast, reference, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_greedy_tokens_match_the_float_model(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = varied_tiny_model()
        fast = native_model("f32")
        for prompt in PROMPTS:
            assert (generate(fast, [prompt], 20, temperature=0, eos_id=None).tokens
                    == generate(model, [prompt], 20, temperature=0, eos_id=None).tokens)
    finally:
        torch.set_num_threads(previous)


def test_the_plan_follows_a_replaced_matrix():
    model = native_model("f32")
    first = native_decode.plan_for(model)
    assert native_decode.plan_for(model) is first  # reused while nothing changed
    block = model.blocks[1]
    zeroed = torch.nn.Linear(block.mlp.proj.in_features, block.mlp.proj.out_features)
    torch.nn.init.zeros_(zeroed.weight)
    torch.nn.init.zeros_(zeroed.bias)
    block.mlp.proj = NativeLinear(zeroed, "f32")
    second = native_decode.plan_for(model)
    assert second is not first
    (fast, _), (reference, _) = decode_both_ways(model, [5, 6, 7])
    torch.testing.assert_close(fast, reference, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fmt", ["f32", "bf16", "i8"])
@pytest.mark.parametrize("tokens_per_row", [1, 3])
def test_a_ragged_batch_in_a_window_of_a_larger_cache(c_kernel_build, fmt, tokens_per_row):
    """The serving engine's decode step: several sequences at their own positions, through
    a view of rows and positions of a larger cache (not contiguous)."""
    import copy as copy_module
    model = native_model(fmt)
    torch.manual_seed(7)
    full = KVCache.for_model(model, 5)
    full.k.normal_()
    full.v.normal_()
    full.lengths.copy_(torch.tensor([9, 3, 20, 14, 0]))
    caches = [copy_module.deepcopy(full) for _ in range(2)]
    tokens = torch.randint(0, model.config.vocab_size, (3, tokens_per_row))
    outputs = []
    for cache, use_plan in zip(caches, (True, False), strict=True):
        view = copy_module.copy(cache)  # rows 1..3, positions 0..31: as fastgpt.serve.engine windows it
        view.k, view.v, view.lengths = cache.k[:, 1:4, :, :32], cache.v[:, 1:4, :, :32], cache.lengths[1:4]
        original = native_decode.plan_for
        if not use_plan:
            native_decode.plan_for = lambda m: None
        try:
            with torch.inference_mode():
                outputs.append(hidden_states_at(model, tokens, view))
        finally:
            native_decode.plan_for = original
    assert native_decode.plan_for(model).fits(torch.zeros(3, tokens_per_row, model.config.n_embd), view, 24)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(caches[0].k, caches[1].k, rtol=2e-5, atol=2e-5)  # the same slots written
    torch.testing.assert_close(caches[0].v, caches[1].v, rtol=2e-5, atol=2e-5)
    rows = [hidden_states_at(model, tokens[i:i + 1], _one_row(caches[0], full, i + 1)) for i in range(3)]
    torch.testing.assert_close(torch.cat(rows), outputs[0], rtol=0, atol=0)  # a row never depends on the others


def _one_row(scratch: KVCache, original: KVCache, row: int) -> KVCache:
    """A one-sequence cache holding `original`'s row as it was before the step."""
    import copy as copy_module
    single = copy_module.copy(scratch)
    single.k, single.v = original.k[:, row:row + 1].clone(), original.v[:, row:row + 1].clone()
    single.lengths = original.lengths[row:row + 1].clone()
    return single


def test_models_it_does_not_cover_take_the_pytorch_blocks():
    assert native_decode.plan_for(varied_tiny_model()) is None  # plain nn.Linear matrices
    mixed = native_model("f32")
    mixed.blocks[0].attn.proj = torch.nn.Linear(mixed.config.n_embd, mixed.config.n_embd)
    assert native_decode.plan_for(mixed) is None
    model = native_model("f32")
    reference = copy.deepcopy(model)
    two = [PROMPTS[0], PROMPTS[1]]  # a ragged batch of two decodes as each prompt alone
    assert (generate(model, two, 8, temperature=0, eos_id=None).tokens
            == [generate(reference, [p], 8, temperature=0, eos_id=None).tokens[0] for p in two])
    assert native_decode.plan_for(model) is not None
    model.train()
    assert native_decode.plan_for(model) is None  # (a plan built before does not outlive eval mode)
