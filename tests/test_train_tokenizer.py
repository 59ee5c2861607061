"""A run's own BPE vocabulary (--tokenizer bpe:VOCAB): learned, sized into the model,
saved with every checkpoint, and used by `fastgpt generate` on that checkpoint."""
from __future__ import annotations

import shutil

import pytest
from train_helpers import as_flags, tiny_options, train_losses, word_text

from fastgpt.bpe import BPETokenizer
from fastgpt.cli import main
from fastgpt.tokenizer import Tokenizer, load_tokenizer
from fastgpt.train import TrainConfig, train
from fastgpt.weights import load_fastgpt

PROMPT = "the king is dead long live the queen"


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe_run")
    text = word_text(tmp / "words.txt")
    result = train(TrainConfig(**tiny_options(text, tmp / "run", tokenizer="bpe:300", max_steps=6)))
    return text, result


def test_bpe_is_learned_on_the_train_split_and_saved_with_the_checkpoint(bpe_run):
    text, result = bpe_run
    model_dir = result.checkpoint / "model"
    saved = load_tokenizer(model_dir)
    assert isinstance(saved, BPETokenizer)
    model, metadata = load_fastgpt(model_dir)
    assert metadata["tokenizer"] == "bpe"
    assert model.config.vocab_size == saved.vocab_size == result.config["vocab_size"] <= 300
    # Deterministic, and learned from the text before the val tail only.
    words = text.read_text()
    cut = int(len(words) * 0.9)
    relearned = BPETokenizer.train(words[:cut], 300)
    assert relearned.merges == saved.merges and relearned.vocab == saved.vocab
    assert BPETokenizer.load(result.run_dir / "tokenizer").merges == saved.merges
    assert load_tokenizer(result.run_dir / "best" / "model").merges == saved.merges


def test_generate_on_the_checkpoint_uses_its_own_vocabulary(bpe_run, capsys):
    _, result = bpe_run
    model_dir = result.checkpoint / "model"
    own = load_tokenizer(model_dir)
    ids = own.encode(PROMPT)
    assert own.decode(ids) == PROMPT
    assert len(ids) < len(PROMPT.encode()) and max(ids) < own.vocab_size  # merged words, small ids
    assert ids != Tokenizer().encode(PROMPT) and max(Tokenizer().encode(PROMPT)) >= own.vocab_size
    # GPT-2's ids would not fit the 300-token model: generating at all shows its own BPE was used.
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and len(out) > len(PROMPT)


def test_a_model_without_a_tokenizer_folder_keeps_gpt2s(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), Tokenizer)
    assert isinstance(load_tokenizer(None), Tokenizer)


def test_init_from_a_bpe_model_keeps_its_vocabulary(bpe_run, tmp_path, capsys):
    """Continuing from a model with its own BPE tokenizes the new text with that BPE; asking
    for GPT-2's tokenizer on that 300-id model is a one-line error, not an index crash."""
    text, result = bpe_run
    model_dir = result.checkpoint / "model"
    options = tiny_options(text, tmp_path / "more", max_steps=2, init_from=str(model_dir))
    for key in ("preset", "n_embd", "n_head", "n_layer", "context_length"):
        del options[key]  # the architecture comes from the starting model
    assert main(["pretrain", *as_flags(options)]) == 0
    continued = tmp_path / "more" / "ckpt_000002" / "model"
    assert load_tokenizer(continued).merges == load_tokenizer(model_dir).merges
    capsys.readouterr()
    assert main(["pretrain", *as_flags({**options, "out_dir": str(tmp_path / "gpt2")}), "--tokenizer", "gpt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fewer than the 50257" in err and "--init-from" in err
    assert not (tmp_path / "gpt2").exists()


def test_resume_with_own_bpe_is_bit_exact(tmp_path):
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "reference", tokenizer="bpe:300", max_steps=8, ckpt_interval=4,
                           keep_last=0)
    reference = train(TrainConfig(**options))
    losses = train_losses(tmp_path / "reference")
    # Continue from the step-4 checkpoint as if the run had been killed after writing it.
    run = tmp_path / "killed"
    shutil.copytree(tmp_path / "reference", run)
    shutil.rmtree(run / "ckpt_000008")
    resumed = train(TrainConfig(**options), resume=run / "ckpt_000004")
    assert resumed.step == 8 and resumed.config["vocab_size"] == reference.config["vocab_size"]
    assert train_losses(run) == losses
    assert resumed.val_loss == reference.val_loss
    assert load_tokenizer(run / "ckpt_000008" / "model").merges == load_tokenizer(run / "ckpt_000004" / "model").merges


def test_prepared_shards_bring_their_bpe(tmp_path, capsys):
    text = word_text(tmp_path / "words.txt")
    own = BPETokenizer.train(text.read_text(), 290).save(tmp_path / "bpe")
    shards = tmp_path / "shards"
    assert main(["prepare", str(text), "--out", str(shards), "--tokenizer", str(own), "--shard-tokens", "1000",
                 "--workers", "1", "--no-progress"]) == 0
    options = tiny_options(text, tmp_path / "run", max_steps=2)
    del options["text"]
    assert main(["pretrain", "--data", str(shards), *as_flags(options)]) == 0
    model_dir = tmp_path / "run" / "ckpt_000002" / "model"
    assert load_fastgpt(model_dir)[0].config.vocab_size == 290
    assert load_tokenizer(model_dir).merges == BPETokenizer.load(own).merges


@pytest.mark.parametrize("flags, expected", [
    (["--tokenizer", "bpe:100"], "bpe:VOCAB"),
    (["--tokenizer", "no/such/dir"], "no/such/dir"),
    (["--tokenizer", "bpe:300", "--vocab-size", "280"], "vocab_size 280"),
])
def test_bad_tokenizer_is_one_line(tmp_path, capsys, flags, expected):
    text = word_text(tmp_path / "words.txt", n_words=300)
    options = tiny_options(text, tmp_path / "run", max_steps=1)
    assert main(["pretrain", *as_flags(options), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert not (tmp_path / "run" / "ckpt_000001").exists()
