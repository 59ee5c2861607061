"""Spam-style classification: data reading and its errors, balancing, splits, last-real-token pooling, training."""
import pytest
import torch

from fastgpt.errors import FastGPTError
from fastgpt.finetune.classify import (
    Example,
    GPTClassifier,
    balance,
    class_names,
    configure_trainable,
    confusion_matrix,
    encode,
    pad_batch,
    per_class_metrics,
    read_labeled_texts,
    split,
    train_classifier,
)
from fastgpt.model import GPT
from fastgpt.tokenizer import Tokenizer


def _write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------- reading
def test_reads_tsv_csv_jsonl(tmp_path):
    tsv = _write(tmp_path / "d.tsv", "ham\thello there\nspam\tWIN a prize\ttoday\n\n")
    assert [(e.label, e.text) for e in read_labeled_texts(tsv)] == [("ham", "hello there"),
                                                                    ("spam", "WIN a prize\ttoday")]
    csv_ = _write(tmp_path / "d.csv", 'msg,kind\n"hi, you",a\nbye,b\n')
    assert [(e.label, e.text) for e in read_labeled_texts(csv_, "msg", "kind")] == [("a", "hi, you"), ("b", "bye")]
    jsonl = _write(tmp_path / "d.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    assert class_names(read_labeled_texts(jsonl)) == ["0", "1"]


@pytest.mark.parametrize("name,content,message", [
    ("no_tab.tsv", "ham\thi\nspam no tab here\n", r"no_tab.tsv:2: expected 'label<TAB>text'"),
    ("empty.tsv", "\n  \n", r"empty.tsv: file is empty"),
    ("unknown.tsv", "ham\thi\neggs\tyo\n", r"unknown.tsv:2: unknown label 'eggs'"),
    ("bad.tsv", b"ham\thi\nspam\t\xff\xfe\n", r"bad.tsv:2: not valid UTF-8"),
    ("cols.csv", "a,b\n1,2\n", r"cols.csv:1: no column 'text'"),
    ("rec.jsonl", '{"text": "x", "label": "a"}\n{"text": "y"}\n', r"rec.jsonl:2: record has no 'label' field"),
    ("one.tsv", "ham\thi\nham\tyo\n", r"at least 2 labels"),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    path = _write(tmp_path / name, content, "wb" if isinstance(content, bytes) else "w")
    with pytest.raises(FastGPTError, match=message):
        class_names(read_labeled_texts(path, labels=["ham", "spam"] if name == "unknown.tsv" else None))


def test_balance_and_split_are_seeded():
    examples = [Example(f"t{i}", "a" if i % 4 else "b", f"f:{i}") for i in range(40)]  # 30 a, 10 b
    balanced = balance(examples, seed=1)
    assert sorted(e.label for e in balanced).count("a") == 10 and len(balanced) == 20
    assert [e.text for e in balance(examples, seed=1)] == [e.text for e in balanced]
    train, val, test = split(balanced, (0.7, 0.1, 0.2), seed=1)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    assert sorted(e.text for e in train + val + test) == sorted(e.text for e in balanced)
    with pytest.raises(FastGPTError, match="--split"):
        split(balanced, (0.5, 0.1, 0.1))


# ---------------------------------------------------------------------- pooling
def test_last_real_token_pooling_ignores_padding_side():
    torch.manual_seed(0)
    clf = GPTClassifier(GPT("tiny"), 3).eval()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    with torch.no_grad():
        alone = torch.cat([clf(torch.tensor([s])) for s in seqs])
        right = clf(*pad_batch(seqs, side="right"))
        left = clf(*pad_batch(seqs, side="left", length=9))
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    ids, _ = pad_batch(seqs, side="right")
    with torch.no_grad():
        assert not torch.allclose(clf(ids)[1], alone[1])  # "position -1" would read a pad


def test_trainable_modes():
    clf = GPTClassifier(GPT("tiny"), 2)
    configure_trainable(clf, "last-n", last_n=1)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("gpt.blocks.1.", "gpt.ln_f.", "head.")) for n in trainable)
    assert "head.weight" in trainable and "gpt.ln_f.weight" in trainable
    configure_trainable(clf, "all")
    assert all(p.requires_grad for p in clf.parameters())
    lora = GPTClassifier(GPT("tiny"), 2)
    configure_trainable(lora, "lora", lora_rank=2)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} >= {"head.weight", "head.bias"}
    assert all(".lora_" in n or n.startswith("head.") for n, p in lora.named_parameters() if p.requires_grad)
    with pytest.raises(FastGPTError, match="--last-n"):
        configure_trainable(GPTClassifier(GPT("tiny"), 2), "last-n", last_n=5)


# ---------------------------------------------------------------------- training and metrics
def _toy_task():
    words = {"spam": ["win", "free", "prize", "cash", "claim", "now"],
             "ham": ["see", "you", "at", "lunch", "later", "ok"]}
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(64):
        label = "spam" if i % 2 else "ham"
        n = int(torch.randint(2, 7, (1,), generator=gen))
        picks = torch.randint(0, 6, (n,), generator=gen).tolist()
        examples.append(Example(" ".join(words[label][j] for j in picks), label, f"toy:{i}"))
    return examples


def test_classification_training_lowers_loss_and_learns():
    torch.manual_seed(0)
    examples = _toy_task()
    names = class_names(examples)
    tok = Tokenizer()
    train = encode(examples[:48], tok, names, 16)
    val = encode(examples[48:], tok, names, 16)
    clf = GPTClassifier(GPT("tiny"), len(names))
    configure_trainable(clf, "all")
    best, history = train_classifier(clf, train, val, epochs=4, lr=1e-3, batch_size=8, log=lambda *_: None)
    losses = [r["loss"] for r in history if r["kind"] == "train"]
    evals = [r for r in history if r["kind"] == "eval"]
    assert sum(losses[-6:]) / 6 < 0.5 * sum(losses[:6]) / 6
    assert evals[-1]["val_accuracy"] >= 0.9
    assert set(best) == set(clf.state_dict())


def test_per_class_metrics():
    matrix = confusion_matrix([0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1], 2)
    assert matrix == [[2, 1], [1, 2]]
    m = per_class_metrics(matrix, ["a", "b"])
    assert m["a"]["precision"] == pytest.approx(2 / 3) and m["a"]["recall"] == pytest.approx(2 / 3)
    assert m["b"]["f1"] == pytest.approx(2 / 3) and m["b"]["support"] == 3
