"""The GPT model itself: sizes, shapes, caching, errors (reference backend)."""
import math

import pytest
import torch

from fastgpt import GPT, FastGPTError, GPTConfig, KVCache, preset


@pytest.mark.parametrize("name, tied, untied", [
    ("gpt2", 124_439_808, 163_037_184),
    ("gpt2-medium", 354_823_168, 406_286_336),
])
def test_parameter_counts_match_gpt2(name, tied, untied):
    with torch.device("meta"):
        model = GPT(name)
    assert model.num_parameters() == tied
    assert model.num_parameters(tied=False) == untied


def test_larger_presets_have_published_sizes():
    # 774M and 1558M with tying (the published GPT-2 large / XL sizes)
    with torch.device("meta"):
        assert round(GPT("gpt2-large").num_parameters() / 1e6) == 774
        assert round(GPT("gpt2-xl").num_parameters() / 1e6) == 1558


def test_lm_head_is_tied_to_token_embedding():
    model = GPT("tiny")
    assert model.lm_head.weight is model.tok_emb.weight


def test_forward_shapes_and_initial_loss_near_uniform():
    model = GPT("tiny").eval()
    idx, targets = torch.randint(0, model.config.vocab_size, (2, 3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, model.config.vocab_size)
    loss = model(idx, targets)  # targets unrelated to inputs: ~uniform prediction
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.1


def test_loss_equals_cross_entropy_of_logits():
    model = GPT("tiny").eval()
    idx, targets = torch.randint(0, 50257, (2, 2, 9))
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(idx, targets), expected)


def test_causality_future_tokens_do_not_change_past_logits():
    model = GPT("tiny").eval()
    idx = torch.randint(0, 50257, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50257
    torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])


def test_kv_cache_decode_matches_full_forward_for_ragged_batch():
    """Each sequence decodes at its own position: prompts of lengths 3 and 6 share a batch."""
    torch.manual_seed(1)
    model = GPT("tiny").eval()
    seqs = [torch.randint(0, 50257, (10,)), torch.randint(0, 50257, (10,))]
    prompt_lengths = torch.tensor([3, 6])
    cache = KVCache.for_model(model, batch_size=2)
    prompt = torch.zeros(2, 6, dtype=torch.long)
    for b, n in enumerate(prompt_lengths.tolist()):
        prompt[b, :n] = seqs[b][:n]
    with torch.no_grad():
        prefill = model(prompt, cache=cache)
        cache.lengths.copy_(prompt_lengths)
        for b, n in enumerate(prompt_lengths.tolist()):
            full = model(seqs[b][None, :n])
            torch.testing.assert_close(prefill[b, n - 1], full[0, n - 1], atol=1e-5, rtol=1e-5)
        for _ in range(4):  # feed each sequence's next true token
            step = torch.stack([seqs[b][cache.lengths[b]] for b in range(2)])[:, None]
            out = model(step, cache=cache)
            for b in range(2):
                n = int(cache.lengths[b]) + 1
                full = model(seqs[b][None, :n])
                torch.testing.assert_close(out[b, 0], full[0, -1], atol=1e-5, rtol=1e-5)
            cache.lengths += 1


def test_input_longer_than_context_is_rejected_with_sizes():
    model = GPT("tiny")
    with pytest.raises(FastGPTError, match="65 tokens.*context length is 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_bad_configs_name_the_field():
    with pytest.raises(FastGPTError, match="unknown preset 'gpt3'"):
        preset("gpt3")
    with pytest.raises(FastGPTError, match="context_length"):
        GPTConfig(context_length=0)
    with pytest.raises(FastGPTError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(FastGPTError, match="unknown config key 'n_layers'"):
        GPTConfig.from_dict({"n_layers": 2})


def test_dropout_is_active_only_in_training():
    model = GPT(preset("tiny", dropout=0.5))
    idx = torch.randint(0, 50257, (1, 8))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_untied_head_is_its_own_parameter():
    tied, untied = GPT("tiny"), GPT(preset("tiny", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight and not untied.tied and tied.tied
    names = dict(untied.named_parameters())
    assert "lm_head.weight" in names and "lm_head.weight" not in dict(tied.named_parameters())
    head = 50257 * 64
    assert untied.num_parameters() == untied.num_parameters(tied=False) == tied.num_parameters() + head
    assert tied.num_parameters(tied=False) == untied.num_parameters()
    idx, targets = torch.randint(0, 50257, (2, 1, 9))
    untied(idx, targets).backward()  # the loss reaches both matrices, separately
    assert untied.lm_head.weight.grad.abs().sum() > 0 and untied.tok_emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tie", [True, False])
def test_pytorch_init_keeps_the_module_defaults(tie):
    torch.manual_seed(0)
    model = GPT(preset("tiny", init="pytorch", tie_embeddings=tie))
    # nn.Embedding's N(0, 1), also when the head is tied to it (not overwritten by Linear's init)
    assert abs(model.tok_emb.weight.std().item() - 1.0) < 0.01
    assert abs(model.pos_emb.weight.std().item() - 1.0) < 0.1
    bound = 1 / math.sqrt(64)  # nn.Linear: kaiming-uniform weights and uniform biases within 1/sqrt(fan_in)
    for linear in (model.blocks[0].attn.qkv, model.blocks[1].mlp.fc):
        assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound
        assert linear.bias.abs().max() > 0.5 * bound
    if not tie:
        assert model.lm_head.weight.abs().max() <= bound
    assert torch.equal(model.ln_f.weight, torch.ones(64)) and torch.equal(model.ln_f.bias, torch.zeros(64))
    gpt2 = GPT("tiny")
    assert abs(gpt2.tok_emb.weight.std().item() - 0.02) < 0.001
    assert abs(gpt2.blocks[0].attn.proj.weight.std().item() - 0.02 / math.sqrt(4)) < 0.002
    model.reset_parameters()  # re-initialising keeps the config's scheme
    assert abs(model.tok_emb.weight.std().item() - 1.0) < 0.01


def test_old_config_dicts_load_and_new_fields_are_checked():
    old = {"vocab_size": 101, "context_length": 32, "n_layer": 2, "n_head": 2, "n_embd": 16,
           "dropout": 0.0, "layer_norm_eps": 1e-5}  # saved before tie_embeddings / init existed
    cfg = GPTConfig.from_dict(old)
    assert cfg.tie_embeddings is True and cfg.init == "gpt2"
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FastGPTError) as err:
        GPTConfig.from_dict({**old, "init": "xavier"}, source="run/config.json")
    assert str(err.value) == "run/config.json: init must be one of 'gpt2', 'pytorch', got 'xavier'"
    with pytest.raises(FastGPTError, match="^config: tie_embeddings must be true or false, got 'no'$"):
        GPTConfig(tie_embeddings="no")
    from fastgpt.config import PRESETS
    assert all(p.tie_embeddings and p.init == "gpt2" for p in PRESETS.values())  # the presets are GPT-2's
