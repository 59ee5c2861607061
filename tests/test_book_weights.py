"""Checkpoints of the book's code ("Build a Large Language Model (From Scratch)") load with their own logits.

The reference is the book's model itself, re-implemented here from its description
(chapters 3-4 and the faster variant of its bonus material): `BookGPT` produces state
dicts with exactly the book's names, and its forward pass is what fastgpt's must equal.
"""
import math

import pytest
import torch
import torch.nn as nn

from fastgpt.cli import main
from fastgpt.errors import FastGPTError
from fastgpt.finetune.checkpoint import load_classifier
from fastgpt.model import GPT
from fastgpt.weights import load_fastgpt, load_pretrained
from fastgpt.weights.book import load_book

SMALL = {"vocab": 97, "context": 16, "d": 32, "layers": 2, "heads": 4}


# ------------------------------------------------------------------ the book's model, written out
class BookLayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class BookAttention(nn.Module):
    """Separate Q/K/V projections, a [C, C] causal-mask buffer, softmax(QK^T / sqrt(head_dim))."""

    def __init__(self, d, context, heads, qkv_bias, mask_in_state_dict):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.W_query = nn.Linear(d, d, bias=qkv_bias)
        self.W_key = nn.Linear(d, d, bias=qkv_bias)
        self.W_value = nn.Linear(d, d, bias=qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(0.0)
        self.register_buffer("mask", torch.triu(torch.ones(context, context), diagonal=1),
                             persistent=mask_in_state_dict)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = q @ k.transpose(2, 3)
        scores = scores.masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).contiguous().view(b, t, d))


class FastAttention(nn.Module):
    """The faster variant: one fused qkv projection and PyTorch's scaled_dot_product_attention."""

    def __init__(self, d, heads, qkv_bias):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=qkv_bias)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).contiguous().view(b, t, d))


class BookBlock(nn.Module):
    def __init__(self, d, context, heads, qkv_bias, fast, mask_in_state_dict):
        super().__init__()
        self.att = (FastAttention(d, heads, qkv_bias) if fast
                    else BookAttention(d, context, heads, qkv_bias, mask_in_state_dict))
        gelu = nn.GELU(approximate="tanh") if fast else BookGELU()
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(d, 4 * d), gelu, nn.Linear(4 * d, d))
        norm = nn.LayerNorm if fast else BookLayerNorm
        self.norm1, self.norm2 = norm(d), norm(d)
        self.drop_shortcut = nn.Dropout(0.0)

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff.layers(self.norm2(x)))


class BookGPT(nn.Module):
    """GPTModel (fast=False) or GPTModelFast (fast=True) of the book, in eval mode with perturbed weights
    (LayerNorm scales and every bias away from 1 and 0, so a misplaced tensor shows)."""

    def __init__(self, vocab, context, d, layers, heads, qkv_bias=False, fast=False, mask_in_state_dict=True,
                 seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(context, d)
        self.drop_emb = nn.Dropout(0.0)
        self.trf_blocks = nn.Sequential(*[BookBlock(d, context, heads, qkv_bias, fast, mask_in_state_dict)
                                          for _ in range(layers)])
        self.final_norm = nn.LayerNorm(d) if fast else BookLayerNorm(d)
        self.out_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))
        self.eval()

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        x = self.final_norm(self.trf_blocks(self.drop_emb(x)))
        return self.out_head(x)


def book_model(**overrides):
    sizes = {**SMALL, **overrides}
    return BookGPT(sizes.pop("vocab"), sizes.pop("context"), sizes.pop("d"), sizes.pop("layers"),
                   sizes.pop("heads"), **sizes)


def tokens(model, batch=3, length=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    vocab, context = model.tok_emb.num_embeddings, model.pos_emb.num_embeddings
    return torch.randint(0, vocab, (batch, length or context), generator=generator)


def assert_same_logits(ours, book, ids):
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), book(ids), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ language models
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("fast,mask", [(False, True), (False, False), (True, False)],
                         ids=["GPTModel", "GPTModel-no-mask", "GPTModelFast"])
def test_logits_equal_the_books_forward(tmp_path, qkv_bias, fast, mask):
    book = book_model(qkv_bias=qkv_bias, fast=fast, mask_in_state_dict=mask)
    state = book.state_dict()
    assert ("trf_blocks.0.att.mask" in state) == mask
    assert ("trf_blocks.0.att.W_query.bias" in state or "trf_blocks.0.att.qkv.bias" in state) == qkv_bias
    torch.save(state, tmp_path / "model.pth")
    ours, metadata = load_book(tmp_path / "model.pth", n_head=SMALL["heads"])
    cfg = ours.config
    assert (cfg.vocab_size, cfg.context_length, cfg.n_embd, cfg.n_layer, cfg.n_head) == (97, 16, 32, 2, 4)
    assert cfg.tie_embeddings is False and cfg.layer_norm_eps == 1e-5
    assert metadata == {"source": "book", "source_file": "model.pth", "qkv_bias": qkv_bias,
                        "book_variant": "GPTModelFast" if fast else "GPTModel"}
    assert_same_logits(ours, book, tokens(book))
    assert_same_logits(ours, book, tokens(book, length=5, seed=2))  # shorter than the context


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_prefixes_and_training_checkpoint_wrapper(tmp_path, prefix):
    book = book_model(qkv_bias=True)
    optimizer = torch.optim.AdamW(book.parameters(), lr=1e-3)
    book(tokens(book)).sum().backward()
    optimizer.step()  # a real optimizer state: weights_only=True must read it too
    state = {prefix + k: v for k, v in book.state_dict().items()}
    torch.save({"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict()}, tmp_path / "ckpt.pth")
    ours, _ = load_book(tmp_path / "ckpt.pth", n_head=4)
    assert_same_logits(ours, book, tokens(book))


def test_standard_width_needs_no_head_count_in_load_pretrained(tmp_path):
    book = book_model(vocab=50, context=8, d=768, layers=1, heads=12)
    torch.save(book.state_dict(), tmp_path / "gpt2-small.pth")
    ids = tokens(book)
    from_file = load_pretrained(tmp_path / "gpt2-small.pth")
    from_dir = load_pretrained(tmp_path)  # a directory holding one .pth
    assert from_file.config.n_head == from_dir.config.n_head == 12
    assert_same_logits(from_file, book, ids)
    assert_same_logits(from_dir, book, ids)


def test_generate_reads_a_book_file_with_gpt2s_tokenizer(tmp_path, capsys):
    """A single .pth holds no tokenizer: generate uses GPT-2's (the book's) instead of failing."""
    book = book_model(vocab=50, context=8, d=768, layers=1, heads=12)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    # "!" is GPT-2 id 0, inside this model's 50-token vocabulary; greedy ids stay below 50
    assert main(["generate", "--model", str(tmp_path / "model.pth"), "--prompt", "!", "--max-new-tokens", "3",
                 "--temperature", "0", "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith("!")


# ------------------------------------------------------------------ convert
def test_convert_to_fastgpt_directory(tmp_path, capsys):
    book = book_model(fast=True, qkv_bias=True)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    assert main(["convert", str(tmp_path / "model.pth"), "--out", str(tmp_path / "out"), "--n-head", "4"]) == 0
    assert "GPTModelFast" in capsys.readouterr().out
    ours, metadata = load_fastgpt(tmp_path / "out")
    assert metadata["source"] == "book" and metadata["qkv_bias"] is True
    assert_same_logits(ours, book, tokens(book))


def test_convert_to_hugging_face_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    book = book_model(qkv_bias=False)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    assert main(["convert", str(tmp_path), "--out", str(tmp_path / "hf"), "--n-head", "4", "--format", "hf"]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = tokens(book)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, book(ids), atol=1e-5, rtol=0)


def test_chapter6_classifier_becomes_a_classify_model(tmp_path, capsys):
    # GPT-2's vocabulary, since `fastgpt classify` encodes with GPT-2's tokenizer as the book does.
    book = book_model(vocab=50257, context=32, qkv_bias=True)
    book.out_head = nn.Linear(SMALL["d"], 2)
    with torch.no_grad():
        book.out_head.bias.copy_(torch.tensor([0.3, -0.2]))
    torch.save(book.state_dict(), tmp_path / "review_classifier.pth")
    out = tmp_path / "spam"
    assert main(["convert", str(tmp_path / "review_classifier.pth"), "--out", str(out), "--n-head", "4",
                 "--labels", "ham,spam"]) == 0
    clf, metadata = load_classifier(out)
    assert metadata["labels"] == ["ham", "spam"] and metadata["source"] == "book"
    ids = tokens(book, length=20)
    with torch.no_grad():  # unpadded: the last real token is the book's last position
        torch.testing.assert_close(clf(ids), book(ids)[:, -1, :], atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["classify", "--model", str(out), "You won a free cruise", "see you at lunch"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("ham", "spam") for line in lines)


# ------------------------------------------------------------------ one-line errors
def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_head_count_is_asked_for_when_the_width_is_not_gpt2s(tmp_path, capsys):
    torch.save(book_model().state_dict(), tmp_path / "model.pth")
    with pytest.raises(FastGPTError, match=r"model\.pth: .*head count.*width 32.*--n-head N"):
        load_pretrained(tmp_path / "model.pth")
    err = _one_line_error(["convert", str(tmp_path / "model.pth"), "--out", str(tmp_path / "o")], capsys)
    assert "--n-head N" in err
    err = _one_line_error(["convert", str(tmp_path / "model.pth"), "--out", str(tmp_path / "o"), "--n-head", "5"],
                          capsys)
    assert err.endswith("--n-head: 5 does not divide the width 32 of " + str(tmp_path / "model.pth"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("trf_blocks.1.ff.layers.2.bias"), "missing tensor 'trf_blocks.1.ff.layers.2.bias'"),
    (lambda s: s.update({"trf_blocks.0.att.extra": torch.zeros(1)}), "unexpected tensor 'trf_blocks.0.att.extra'"),
    (lambda s: s.update({"trf_blocks.0.att.W_key.weight": torch.zeros(32, 31)}),
     r"tensor 'trf_blocks.0.att.W_key.weight' has shape \(32, 31\), expected \(32, 32\)"),
    (lambda s: s.update({"trf_blocks.0.att.mask": torch.ones(16, 16)}), "att.mask is not the causal mask"),
    (lambda s: s.update({"trf_blocks.0.att.W_query.bias": torch.zeros(32)}),
     "missing tensor 'trf_blocks.0.att.W_key.bias'"),  # a bias on Q alone: the layout is inconsistent
    (lambda s: s.update({"trf_blocks.3.norm1.scale": torch.ones(32)}), r"blocks numbered \[0, 1, 3\]"),
])
def test_bad_state_dicts_name_the_tensor(tmp_path, capsys, edit, message):
    state = book_model().state_dict()
    edit(state)
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(FastGPTError, match=message):
        load_book(tmp_path / "model.pth", n_head=4)
    assert "model.pth" in _one_line_error(
        ["convert", str(tmp_path / "model.pth"), "--out", str(tmp_path / "o"), "--n-head", "4"], capsys)


def test_files_that_are_not_book_checkpoints(tmp_path, capsys):
    torch.save(GPT("tiny").state_dict(), tmp_path / "fastgpt.pth")
    with pytest.raises(FastGPTError, match="not a checkpoint of the book's GPTModel"):
        load_pretrained(tmp_path / "fastgpt.pth")
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a module object: weights_only refuses it
    with pytest.raises(FastGPTError, match=r"pickled\.pth: not a loadable PyTorch weights file"):
        load_pretrained(tmp_path / "pickled.pth")
    with pytest.raises(FastGPTError, match="holds several checkpoints"):
        load_pretrained(tmp_path)
    training_checkpoint = tmp_path / "ckpt_000010"  # fastgpt's own: optimizer.pt and rng.pt are not models
    training_checkpoint.mkdir()
    torch.save({"step": torch.tensor(1)}, training_checkpoint / "optimizer.pt")
    torch.save({"cpu": torch.zeros(2)}, training_checkpoint / "rng.pt")
    with pytest.raises(FastGPTError, match="not a model directory"):
        load_pretrained(training_checkpoint)
    (tmp_path / "notes.txt").write_text("hello")
    assert "expected a .pth or .pt file" in _one_line_error(
        ["convert", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o")], capsys)


def test_classifier_errors(tmp_path, capsys):
    book = book_model()
    book.out_head = nn.Linear(SMALL["d"], 3)
    torch.save(book.state_dict(), tmp_path / "clf.pth")
    with pytest.raises(FastGPTError, match="chapter-6 classifier .*fastgpt convert"):
        load_book(tmp_path / "clf.pth", n_head=4)
    argv = ["convert", str(tmp_path / "clf.pth"), "--out", str(tmp_path / "o"), "--n-head", "4"]
    assert "no Hugging Face" in _one_line_error(argv + ["--format", "hf"], capsys)
    assert "has 3 classes, got 2 names" in _one_line_error(argv + ["--labels", "ham,spam"], capsys)
    state = book.state_dict()
    state.pop("out_head.bias")
    torch.save(state, tmp_path / "clf.pth")
    assert "no out_head.bias" in _one_line_error(argv, capsys)
