"""Generation: KV-cache decoding of ragged batches, sampling filters, stopping, streaming text."""
import math
import warnings

import pytest
import torch
from conftest import requires_gpu, varied_tiny_model

from fastgpt.config import preset
from fastgpt.errors import FastGPTError
from fastgpt.generate import TextStream, generate
from fastgpt.model import GPT
from fastgpt.sampling import SamplingParams, filter_logits, sample, sample_with_noise
from fastgpt.tokenizer import Tokenizer

# Ragged prompts: lengths 1, 5 and 12 share one batch.
PROMPTS = [[464], [15496, 11, 995, 0, 314], [40, 1101, 257, 1310, 2099, 286, 262, 2104, 13, 632, 373, 845]]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


@pytest.fixture(scope="module")
def model():
    return varied_tiny_model()


def test_the_test_model_does_not_repeat_itself(model):
    assert all(len(set(tokens)) > 15 for tokens in greedy(model, PROMPTS, 40).tokens)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def greedy(model, prompts, n, **kw):
    return generate(model, prompts, n, temperature=0, eos_id=None, **kw)


# ------------------------------------------------------------------ KV cache
def test_cached_greedy_equals_uncached_on_a_ragged_batch(model):
    cached = greedy(model, PROMPTS, 40)
    uncached = greedy(model, PROMPTS, 40, use_cache=False)
    assert [len(t) for t in cached.tokens] == [40, 40, 40]
    assert cached.tokens == uncached.tokens
    assert cached.finish_reasons == ["length"] * 3


def test_ragged_batch_equals_each_prompt_alone(model):
    """The padding the prefill wrote past a short prompt is overwritten, never attended to."""
    batch = greedy(model, PROMPTS, 30)
    for b, prompt in enumerate(PROMPTS):
        assert greedy(model, [prompt], 30).tokens[0] == batch.tokens[b]


def test_single_token_prompts_prefill_through_the_decode_path(model):
    prompts = [[464], [1000]]
    assert greedy(model, prompts, 30).tokens == greedy(model, prompts, 30, use_cache=False).tokens


def test_generation_past_the_context_slides_the_window(model):
    """64-token context, 12-token prompt + 100 new tokens: the cache is re-prefilled with
    the last 32 tokens and both paths see the same windows."""
    cached = greedy(model, PROMPTS, 100)
    assert [len(t) for t in cached.tokens] == [100, 100, 100]
    assert cached.tokens == greedy(model, PROMPTS, 100, use_cache=False).tokens


def test_long_prompt_is_cropped_from_the_left_with_a_warning(model):
    long_prompt = [(7 * i) % 50000 for i in range(80)]
    with pytest.warns(UserWarning, match="keeping its last 64"):
        out = greedy(model, [long_prompt], 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert greedy(model, [long_prompt[-64:]], 5).tokens == out.tokens


def test_tensor_prompts_and_the_model_method(model):
    ids = torch.tensor(PROMPTS[1])
    assert model.generate(ids, 8, temperature=0, eos_id=None).tokens == greedy(model, [PROMPTS[1]], 8).tokens


def test_training_mode_is_restored(model):
    model.train()
    greedy(model, PROMPTS, 3)
    assert model.training
    model.eval()


# ------------------------------------------------------------------ equality with Hugging Face
def test_greedy_equals_huggingface_generate():
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny")
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, initializer_range=0.2,
                                     layer_norm_epsilon=cfg.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(0)
    try:
        hf = transformers.GPT2LMHeadModel(hf_cfg, attn_implementation="eager").eval()
    except TypeError:
        hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT(cfg).eval()
    hf_state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    mapping = {"tok_emb.weight": "wte.weight", "pos_emb.weight": "wpe.weight",
               "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
    for i in range(cfg.n_layer):
        for ours_name, hf_name in [("ln_1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                   ("ln_2", "ln_2"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]:
            for p in ("weight", "bias"):
                mapping[f"blocks.{i}.{ours_name}.{p}"] = f"h.{i}.{hf_name}.{p}"
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for ours_name, hf_name in mapping.items():
            value = hf_state[hf_name].t() if hf_name.endswith(conv1d) else hf_state[hf_name]
            ours.get_parameter(ours_name)[:len(value)].copy_(value)  # (the embedding's pad rows stay zero)

    for prompt in PROMPTS[1:]:
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True,
                               pad_token_id=0, eos_token_id=None)
        expected = expected[0, len(prompt):].tolist()
        assert len(set(expected)) > 8  # a varied continuation, not one token repeated
        assert greedy(ours, [prompt], 32).tokens[0] == expected


# ------------------------------------------------------------------ sampling
def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, -3.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_k=10)).all()


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    nucleus = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert nucleus(0.4) == [False, True, False, False]       # 0.5 alone reaches 0.4
    assert nucleus(0.7) == [False, True, False, True]        # 0.5 + 0.3
    assert nucleus(0.9) == [True, True, False, True]         # 0.5 + 0.3 + 0.15
    assert nucleus(1.0) == [True, True, True, True]


def test_sampling_draws_only_from_the_filtered_set_in_proportion():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    drawn = sample(logits, SamplingParams(temperature=1.0, top_p=0.7), gen)
    counts = torch.bincount(drawn, minlength=4).tolist()
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 4000 - 0.5 / 0.8) < 0.03  # renormalised inside the nucleus
    drawn = sample(logits, SamplingParams(temperature=1.0, top_k=3), gen)
    assert torch.bincount(drawn, minlength=4)[2] == 0


def test_temperature_zero_is_argmax_and_low_temperature_approaches_it():
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, 0.0, -1.0]])
    assert sample(logits, SamplingParams(temperature=0)).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    drawn = sample(logits.repeat(500, 1), SamplingParams(temperature=0.01), gen)
    assert drawn.view(500, 2).eq(torch.tensor([1, 0])).all()


def test_seed_reproduces_and_differs(model):
    kw = dict(temperature=1.0, top_k=100, eos_id=None)
    first = generate(model, PROMPTS, 30, seed=7, **kw).tokens
    assert generate(model, PROMPTS, 30, seed=7, **kw).tokens == first
    assert generate(model, PROMPTS, 30, seed=7, use_cache=False, **kw).tokens == first
    assert generate(model, PROMPTS, 30, seed=8, **kw).tokens != first


@pytest.mark.parametrize("kwargs, argument", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments_are_named(model, kwargs, argument):
    with pytest.raises(FastGPTError, match=argument):
        generate(model, PROMPTS, 3, **kwargs)


@pytest.mark.parametrize("prompts, max_new, kwargs, message", [
    ([[]], 3, {}, r"prompt_ids\[0\] is empty"),
    ([[1, 2], [50257]], 3, {}, r"prompt_ids\[1\] holds 50257"),
    ([[1]], -1, {}, "max_new_tokens"),
    ([[1]], 3, dict(stop_strings=["x"]), "tokenizer"),
])
def test_bad_prompts_and_options(model, prompts, max_new, kwargs, message):
    with pytest.raises(FastGPTError, match=message):
        generate(model, prompts, max_new, **kwargs)


# ------------------------------------------------------------------ stopping
def test_eos_stops_only_its_own_sequence(model):
    free = greedy(model, PROMPTS, 30).tokens
    eos = free[1][6]  # the token sequence 1 produces at step 6 becomes "end of text"
    stopped = generate(model, PROMPTS, 30, temperature=0, eos_id=eos)
    for b, tokens in enumerate(free):
        if eos in tokens:
            first = tokens.index(eos)
            assert stopped.tokens[b] == tokens[:first] and stopped.finish_reasons[b] == "eos"
        else:
            assert stopped.tokens[b] == tokens and stopped.finish_reasons[b] == "length"
    assert stopped.finish_reasons[1] == "eos"


def test_stop_string_spanning_tokens(model, tokenizer):
    free = greedy(model, PROMPTS, 30).tokens[2]
    text = tokenizer.decode(free[:12])
    stop = text[-6:] if len(tokenizer.decode(free[11:12])) < 6 else text[-3:]
    # the first token after which the decoded text contains the stop string
    end = next(n for n in range(1, 31) if stop in tokenizer.decode(free[:n]))
    out = generate(model, [PROMPTS[2]], 30, temperature=0, eos_id=None, stop_strings=[stop], tokenizer=tokenizer)
    assert out.tokens[0] == free[:end] and out.finish_reasons == ["stop"]


def test_a_sequence_stopped_at_the_context_edge_rides_along_while_another_slides(model, tokenizer):
    """Sequence 0 (10-token prompt) stops on its 55th token, holding 65 > 64 tokens;
    sequence 1 goes on past the context. The finished one must neither break the
    re-prefill nor the decode steps, nor change sequence 1's tokens."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50000, (10,), generator=g).tolist(),
               torch.randint(0, 50000, (40,), generator=g).tolist()]
    free = greedy(model, prompts, 80).tokens
    stop = tokenizer.decode(free[0][:55])[-6:]
    assert next(n for n in range(1, 81) if stop in tokenizer.decode(free[0][:n])) == 55
    assert stop not in tokenizer.decode(free[1])
    for use_cache in (True, False):
        out = greedy(model, prompts, 80, stop_strings=[stop], tokenizer=tokenizer, use_cache=use_cache)
        assert out.tokens == [free[0][:55], free[1]] and out.finish_reasons == ["stop", "length"]


def test_on_token_streams_every_kept_token(model):
    seen = []
    out = greedy(model, PROMPTS, 10, on_token=lambda b, t: seen.append((b, t)))
    for b in range(3):
        assert [t for sb, t in seen if sb == b] == out.tokens[b]
    assert out.stats.new_tokens == 30 and out.stats.decode_tokens == 27
    assert out.stats.decode_tokens_per_s > 0 and out.stats.prefill_s > 0


# ------------------------------------------------------------------ streaming text
def test_text_stream_never_splits_a_character(tokenizer):
    text = "🤗 naïve café 日本語 €!"
    stream, pieces = TextStream(tokenizer), []
    for token in tokenizer.encode(text):
        pieces.append(stream.push(token))
        assert "\ufffd" not in pieces[-1]
    pieces.append(stream.finish())
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 3  # emitted along the way, not only at the end


def test_text_stream_holds_back_and_cuts_at_stop_strings(tokenizer):
    stream = TextStream(tokenizer, stop_strings=["### Instruction", "\n\n\n"])
    out = "".join(stream.push(t) for t in tokenizer.encode("The answer is 4.\n\n### Instruction: more"))
    out += stream.finish()
    assert out == "The answer is 4.\n\n"


def test_noise_sampling_draws_in_proportion_and_greedy_ignores_the_noise():
    """The exponential race that the CUDA-graph step samples with: argmax(probs / Exp(1) noise)."""
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().expand(4000, 4)
    noise = torch.empty(4000, 4).exponential_(generator=torch.Generator().manual_seed(0))
    drawn = sample_with_noise(logits, SamplingParams(temperature=1.0, top_p=0.7), noise)
    counts = torch.bincount(drawn, minlength=4).tolist()
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 4000 - 0.5 / 0.8) < 0.03
    drawn = sample_with_noise(logits, SamplingParams(temperature=1.0), noise)
    assert max(abs(c / 4000 - p) for c, p in zip(torch.bincount(drawn, minlength=4).tolist(), probs.tolist(),
                                                   strict=True)) < 0.03
    assert sample_with_noise(logits[:2], SamplingParams(temperature=0), noise[:2]).tolist() == [1, 1]


def test_the_graph_recorded_step_decodes_a_ragged_batch_like_generate(model):
    """`sampling_decode_step` is what the CUDA graph records; run eagerly here on a ragged batch
    where one row finishes early and rides along, it gives each row's own greedy tokens."""
    from fastgpt.generate import sampling_decode_step
    from fastgpt.kv_cache import KVCache
    steps, params = 12, SamplingParams(temperature=0)
    expected = [generate(model, [p], steps + 1, temperature=0, eos_id=None).tokens[0] for p in PROMPTS]
    cache = KVCache.for_model(model, len(PROMPTS), 40)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    idx = torch.zeros(len(PROMPTS), int(lengths.max()), dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        idx[b, :len(p)] = torch.tensor(p)
    advance = torch.ones(len(PROMPTS), dtype=torch.long)
    noise = torch.ones(len(PROMPTS), model.config.vocab_size)
    with torch.inference_mode():
        hidden = model.hidden_states(idx, cache)
        cache.lengths.copy_(lengths)
        tokens = model.lm_head(hidden[torch.arange(len(PROMPTS)), lengths - 1]).argmax(-1)[:, None]
        got = [[t] for t in tokens[:, 0].tolist()]
        for step in range(steps):
            if step == 3:
                advance[1] = 0  # sequence 1 finishes with this step's token, then stays where it is
            tokens[:, 0] = sampling_decode_step(model, tokens, cache, advance, params, noise)
            for b, t in enumerate(tokens[:, 0].tolist()):
                if b != 1 or step <= 3:
                    got[b].append(t)
    assert got[0] == expected[0] and got[2] == expected[2]
    assert got[1] == expected[1][:5]
    assert cache.lengths.tolist() == [len(PROMPTS[0]) + steps, len(PROMPTS[1]) + 3, len(PROMPTS[2]) + steps]


@pytest.mark.slow  # ~40 s of compilation on 2 shared cores
def test_compiled_decode_step_gives_the_eager_tokens(model, one_thread):
    eager = generate(model, PROMPTS, 8, temperature=0, eos_id=None)
    compiled = generate(model, PROMPTS, 8, temperature=0, eos_id=None, compile=True)
    assert compiled.tokens == eager.tokens


def test_fp16_weights_decode_on_cpu(model):
    """fp16 is the 16-bit format of AVX2 CPUs (F16C); the cached decode step must run in it."""
    import copy
    exact = generate(model, [PROMPTS[2]], 8, temperature=0, eos_id=None).tokens[0]
    half = generate(copy.deepcopy(model).half(), [PROMPTS[2]], 8, temperature=0, eos_id=None).tokens[0]
    assert half[:4] == exact[:4]


# ------------------------------------------------------------------ GPU
@requires_gpu
def test_cuda_graph_decode_equals_eager():
    torch.manual_seed(0)
    model = GPT("mini").cuda().eval()
    graphed = generate(model, PROMPTS, 40, temperature=0, eos_id=None, cuda_graph=True)
    eager = generate(model, PROMPTS, 40, temperature=0, eos_id=None, cuda_graph=False)
    assert graphed.tokens == eager.tokens


@requires_gpu
def test_cuda_graph_samples_a_batch_reproducibly_in_the_graph():
    torch.manual_seed(0)
    model = GPT("mini").cuda().eval()
    prompts = PROMPTS * 3  # batch 9, ragged
    runs = [generate(model, prompts, 30, temperature=0.8, top_k=50, seed=7, eos_id=None, cuda_graph=True)
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and all(len(t) == 30 for t in runs[0].tokens)
    assert len({tuple(t) for t in runs[0].tokens}) > 3  # sampled, not one sequence repeated


@requires_gpu
def test_bf16_generation_on_gpu_runs_with_the_triton_backend():
    torch.manual_seed(0)
    model = GPT("mini").cuda().to(torch.bfloat16).eval()
    out = generate(model, PROMPTS, 20, temperature=0.7, top_p=0.9, seed=0)
    assert all(len(t) <= 20 for t in out.tokens)


# ------------------------------------------------------------------ int8 weight-only decoding
def test_int8_linear_is_the_dequantized_matmul():
    from fastgpt.quantize import Int8Linear
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    q = Int8Linear(linear, dtype=torch.float32)
    dequantized = q.qweight.float() * q.scale[:, None]
    assert (dequantized - linear.weight).abs().le(q.scale[:, None] / 2 + 1e-7).all()  # half a step at most
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, dequantized, linear.bias), rtol=1e-5, atol=1e-5)


def test_int8_model_stays_close_to_the_float_model_and_generates(model):
    import copy

    from fastgpt.quantize import quantize_int8, weight_bytes_per_token
    quantized = quantize_int8(copy.deepcopy(model))
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        exact, approx = model(ids)[0], quantized(ids)[0].float()
    # ~3% relative error on this large-weight test model (~1% at GPT-2's init scale)
    assert (approx - exact).norm() / exact.norm() < 0.05
    assert weight_bytes_per_token(quantized) < 0.3 * weight_bytes_per_token(model)
    out = generate(quantized, PROMPTS, 12, temperature=0, eos_id=None)
    assert [len(t) for t in out.tokens] == [12, 12, 12]
