"""The tiny GPT generates the same greedy tokens on the Triton backend as on the torch one,
recomputing every step (fused attention) and with the KV cache (prefill + decode attention).

The model is the varied tiny one (conftest): a default-initialised random GPT repeats one
token whatever it attends to, so a decode step reading one cache entry too few would
still produce the same tokens."""
import pytest
import torch
from conftest import DEVICE, varied_tiny_model

from fastgpt import ops
from fastgpt.generate import generate
from fastgpt.kv_cache import KVCache

NEW_TOKENS = 5  # the interpreter runs every kernel in numpy: keep it short
# fp32 logits from two programs differ by summation order only: observed 6 ulps of the
# largest logit (5.7e-6 at logits up to 8) between the backends.
LOGIT_ULPS = 32


def assert_same_logits(actual, expected):
    atol = LOGIT_ULPS * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def model():
    return varied_tiny_model().to(DEVICE)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)


@torch.no_grad()
def greedy_without_cache(model, idx, steps):
    for _ in range(steps):
        next_token = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, next_token], dim=1)
    return idx


@torch.no_grad()
def greedy_with_cache(model, idx, steps):
    cache = KVCache.for_model(model, idx.shape[0], max_length=idx.shape[1] + steps)
    logits = model(idx, cache=cache)  # prefill
    cache.lengths += idx.shape[1]
    for _ in range(steps):
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, next_token], dim=1)
        logits = model(next_token, cache=cache)  # one decode step per sequence
        cache.lengths += 1
    return idx


@pytest.mark.parametrize("loop", [greedy_without_cache, greedy_with_cache], ids=["no_cache", "kv_cache"])
def test_greedy_tokens_equal_on_triton_and_torch(model, prompt, loop):
    with ops.use_backend("torch"):
        expected = loop(model, prompt, NEW_TOKENS)
    with ops.use_backend("triton"):
        got = loop(model, prompt, NEW_TOKENS)
    assert torch.equal(got, expected)
    # and caching changes nothing
    with ops.use_backend("torch"):
        assert torch.equal(greedy_without_cache(model, prompt, NEW_TOKENS), expected)


def test_logits_close_on_both_backends_with_cache(model, prompt):
    """The tokens agree because the logits do (not by a lucky argmax)."""
    def logits_of(backend):
        with ops.use_backend(backend), torch.no_grad():
            cache = KVCache.for_model(model, 2, max_length=16)
            prefill = model(prompt, cache=cache)
            cache.lengths += prompt.shape[1]
            step = model(prefill[:, -1:].argmax(-1), cache=cache)
            return prefill, step

    (p_torch, s_torch), (p_triton, s_triton) = logits_of("torch"), logits_of("triton")
    assert_same_logits(p_triton, p_torch)
    assert_same_logits(s_triton, s_torch)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_decode_step_equals_recomputing_the_whole_sequence(model, prompt, backend):
    """The cached decode step's logits are those of a full forward pass over every token so far
    (a step that skips a cache entry, or reads one too many, changes them)."""
    with ops.use_backend(backend), torch.no_grad():
        cache = KVCache.for_model(model, 2, max_length=prompt.shape[1] + 3)
        logits = model(prompt, cache=cache)
        cache.lengths += prompt.shape[1]
        idx = prompt
        for _ in range(3):
            next_token = logits[:, -1:].argmax(-1)
            idx = torch.cat([idx, next_token], dim=1)
            logits = model(next_token, cache=cache)
            cache.lengths += 1
            full = model(idx)[:, -1:]
            assert_same_logits(logits, full)
    assert len(set(idx[0, prompt.shape[1]:].tolist())) > 1, "the model repeats one token: the check is void"


def test_generate_api_on_ragged_prompts(model):
    """fastgpt.generate, greedy, KV cache, prompts of different lengths: every decode step
    runs the decode kernel over per-sequence lengths."""
    prompts = [[464, 3290, 318, 257, 1332], [40], [15496, 11, 616, 1438, 318, 1757, 290, 314]]
    with ops.use_backend("torch"):
        expected = generate(model, prompts, NEW_TOKENS, temperature=0, eos_id=None).tokens
    with ops.use_backend("triton"):
        got = generate(model, prompts, NEW_TOKENS, temperature=0, eos_id=None).tokens
    assert got == expected
    assert all(len(tokens) == NEW_TOKENS for tokens in got)
