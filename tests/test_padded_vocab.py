"""The token embedding / LM head is stored with its vocabulary padded to a multiple of 64 (zero rows);
files, logits, losses and generated ids only ever see the real vocabulary."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRETER
from safetensors import safe_open

from fastgpt import ops
from fastgpt.cached_forward import head_logits
from fastgpt.config import VOCAB_PAD, GPTConfig, preset
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT
from fastgpt.train.optim import make_optimizer, pad_vocab_moments
from fastgpt.weights import load_fastgpt, load_pretrained, save_fastgpt, save_pretrained
from fastgpt.weights.state import pad_vocab_rows

V = 97  # a tiny vocabulary: stored as 128 rows


def tiny(tie: bool = True, init: str = "gpt2", vocab: int = V) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, context_length=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tie,
                     init=init)


def vocab_matrices(model: GPT) -> list[torch.Tensor]:
    return [model.tok_emb.weight] + ([] if model.tied else [model.lm_head.weight])


def pad_rows(model: GPT) -> list[torch.Tensor]:
    return [m[model.config.vocab_size:] for m in vocab_matrices(model)]


@pytest.mark.parametrize("vocab,padded", [(97, 128), (64, 64), (1, 64), (50257, 50304)])
def test_padded_vocab_size_rounds_up_to_a_multiple_of_64(vocab, padded):
    assert VOCAB_PAD == 64 and tiny(vocab=vocab).padded_vocab_size == padded


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("init", ["gpt2", "pytorch"])
def test_stored_rows_are_a_multiple_of_64_and_the_pad_rows_start_at_zero(tie, init):
    torch.manual_seed(3)
    model = GPT(tiny(tie, init))
    assert model.tok_emb.weight.shape == (128, 32) and model.lm_head.weight.shape == (128, 32)
    assert model.tied == tie
    for m in vocab_matrices(model):
        assert torch.equal(m[V:], torch.zeros(128 - V, 32))
        assert m[:V].abs().min() > 0  # the real rows are random
    std = model.tok_emb.weight[:V].std().item()
    assert (0.015 < std < 0.025) if init == "gpt2" else (0.9 < std < 1.1)  # the scheme's own scale


def test_num_parameters_counts_only_the_real_vocabulary():
    with torch.device("meta"):
        gpt2 = GPT(preset("gpt2"))
        untied = GPT(preset("gpt2", tie_embeddings=False))
    assert gpt2.tok_emb.weight.shape == (50304, 768)
    assert gpt2.num_parameters() == 124_439_808
    assert gpt2.num_parameters(tied=False) == 124_439_808 + 50257 * 768
    assert untied.num_parameters() == untied.num_parameters(tied=False) == 124_439_808 + 50257 * 768


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tie", [True, False])
def test_pad_rows_stay_zero_through_adamw_steps_with_weight_decay(tie, backend):
    if backend == "triton" and not INTERPRETER and not torch.cuda.is_available():
        pytest.skip("no Triton here")
    torch.manual_seed(0)
    model = GPT(tiny(tie))
    before = [m.detach().clone() for m in vocab_matrices(model)]
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    with ops.use_backend(backend):
        for _ in range(3):
            idx, targets = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
            model(idx, targets).backward()
            for m in vocab_matrices(model):
                assert torch.equal(m.grad[V:], torch.zeros_like(m.grad[V:]))  # exactly no gradient
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for m, start in zip(vocab_matrices(model), before, strict=True):
        assert not torch.equal(m[:V], start[:V])  # it did train, with decay on
        assert torch.equal(m[V:], torch.zeros_like(m[V:]))
    for m in vocab_matrices(model):
        moments = optimizer.state[m]
        assert torch.equal(moments["exp_avg"][V:], torch.zeros_like(m[V:]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_equals_the_unpadded_computation(backend):
    if backend == "triton" and not INTERPRETER and not torch.cuda.is_available():
        pytest.skip("no Triton here")
    torch.manual_seed(1)
    model = GPT(tiny(tie=False))
    with torch.no_grad():  # non-zero rows past V must not change anything either
        model.lm_head.weight[V:] = 5.0
    idx, targets = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    targets[0, ::3] = -100
    with ops.use_backend(backend):
        loss = model(idx, targets)
        hidden = model.hidden_states(idx)
    expected = F.cross_entropy(hidden.reshape(-1, 32) @ model.lm_head.weight[:V].t(), targets.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def negative_logit_model(tie: bool = True) -> GPT:
    """A model whose every real logit is negative, so the zero logit of a pad column would win any argmax."""
    torch.manual_seed(2)
    model = GPT(tiny(tie)).eval()
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)  # every hidden state is the all-ones vector
        for m in vocab_matrices(model):
            m[:V] = -m[:V].abs() - 0.01
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_logits_and_generated_ids_never_reach_the_pad(tie):
    model = negative_logit_model(tie)
    idx = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (2, 5, V)
        assert (logits < 0).all() and model.lm_head(model.hidden_states(idx)).argmax(-1).min() >= V
        assert head_logits(model, model.hidden_states(idx)[:, -1]).shape == (2, V)
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, seed=4), dict(temperature=2.0, top_k=50, seed=5)):
        out = model.generate([[1, 2, 3], [4]], 8, eos_id=None, **kwargs)
        assert all(0 <= t < V for seq in out.tokens for t in seq) and all(len(s) == 8 for s in out.tokens)


@pytest.mark.parametrize("tie", [True, False])
def test_native_save_holds_the_real_rows_and_loads_back_bit_exact(tmp_path, tie):
    torch.manual_seed(5)
    model = GPT(tiny(tie))
    save_fastgpt(model, tmp_path / "m")
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert f.get_slice("tok_emb.weight").get_shape() == [V, 32]
        assert ("lm_head.weight" in f.keys()) == (not tie)
        if not tie:
            assert f.get_slice("lm_head.weight").get_shape() == [V, 32]
    loaded, _ = load_fastgpt(tmp_path / "m")
    assert loaded.tied == tie
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name  # pad rows included: zero again
    assert loaded.tok_emb.weight.shape == (128, 32)


def test_hugging_face_export_of_the_gpt2_vocabulary_writes_50257_rows(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    model = GPT(preset("tiny", tie_embeddings=False)).eval()  # GPT-2's vocabulary, tiny width
    assert model.lm_head.weight.shape == (50304, 64)
    save_pretrained(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 50257
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.get_slice("transformer.wte.weight").get_shape() == [50257, 64]
        assert f.get_slice("lm_head.weight").get_shape() == [50257, 64]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)
    back = load_pretrained(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values(),
                                                  strict=True))


def test_a_book_checkpoint_loads_padded(tmp_path):
    from test_book_weights import SMALL, book_model

    from fastgpt.weights.book import load_book
    book = book_model()
    torch.save(book.state_dict(), tmp_path / "model.pth")
    ours, _ = load_book(tmp_path / "model.pth", n_head=SMALL["heads"])
    assert ours.config.vocab_size == V and not ours.tied
    for ours_m, book_m in ((ours.tok_emb.weight, book.tok_emb.weight), (ours.lm_head.weight, book.out_head.weight)):
        assert ours_m.shape == (128, 32)
        assert torch.equal(ours_m[:V], book_m) and not ours_m[V:].any()


def test_pad_vocab_rows_checks_the_row_count():
    cfg = tiny()
    padded = pad_vocab_rows(torch.ones(V, 3), cfg)
    assert padded.shape == (128, 3) and padded[:V].all() and not padded[V:].any()
    already = torch.ones(128, 3)
    assert pad_vocab_rows(already, cfg) is already
    with pytest.raises(FastGPTError, match="has 100 rows, but the config needs 97"):
        pad_vocab_rows(torch.ones(100, 3), cfg)


def test_optimizer_moments_saved_unpadded_are_padded_on_load():
    """A checkpoint written before the vocabulary was stored padded holds (vocab_size, C) moments."""
    torch.manual_seed(7)
    model = GPT(tiny(tie=False, vocab=97))
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    model(torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))).backward()
    optimizer.step()
    state = optimizer.state_dict()
    live = [p for group in optimizer.param_groups for p in group["params"]]
    keys = [k for group in state["param_groups"] for k in group["params"]]
    vocab_keys = {k for k, p in zip(keys, live, strict=True) if any(p is m for m in vocab_matrices(model))}
    assert len(vocab_keys) == 2  # (mlp.fc's 4C = 128 rows as well: told apart by identity, not shape)
    old = {**state, "state": {k: {n: t[:V] if k in vocab_keys and t.dim() == 2 else t for n, t in v.items()}
                              for k, v in state["state"].items()}}
    fitted = pad_vocab_moments(old, optimizer, model)
    for key, entry in state["state"].items():
        for name, t in entry.items():
            assert torch.equal(fitted["state"][key][name], t), (key, name)
    fresh = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    fresh.load_state_dict(fitted)
    fresh.step()  # the shapes fit the parameters


def test_resume_from_a_checkpoint_with_unpadded_moments_is_exact(tmp_path):
    from train_helpers import tiny_options, train_losses, word_text

    from fastgpt.train import TrainConfig, train
    text = word_text(tmp_path / "words.txt")
    reference = train(TrainConfig(**tiny_options(text, tmp_path / "reference", max_steps=6)))
    run = tmp_path / "run"
    options = tiny_options(text, run, max_steps=6, ckpt_interval=3, keep_last=0)
    train(TrainConfig(**{**options, "max_steps": 3}))
    ckpt = run / "ckpt_000003"
    with safe_open(ckpt / "model" / "model.safetensors", "pt") as f:
        assert f.get_slice("tok_emb.weight").get_shape() == [50257, 32]  # the real rows, as before the change
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    moments = saved["optimizer"]["state"]
    for entry in moments.values():  # rewrite it as an older fastgpt wrote it: vocab_size rows
        for name, t in entry.items():
            if t.dim() == 2 and t.shape[0] == 50304:
                entry[name] = t[:50257].clone()
    torch.save(saved, ckpt / "optimizer.pt")
    resumed = train(TrainConfig(**options), resume=run)
    assert resumed.step == 6
    assert train_losses(run) == dict(enumerate(reference.losses, start=1))  # exact float equality
