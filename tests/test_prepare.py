"""`fastgpt prepare`: streamed tokenization equals whole-text encoding; shards, meta and errors."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastgpt.cli import main as cli_main
from fastgpt.data.prepare import Source, document_blocks
from fastgpt.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

# Lines that end in spaces, CRLF, tabs, blank runs, indented starts, unicode spaces: the cases
# where cutting a text at the wrong newline would change GPT-2's pre-tokenization.
TRICKY = ("First line.\nSecond line ends in spaces   \nthird\r\nfourth\r\n\r\n\n\n  indented\n\tTabbed\n"
          "word\n word\nx\u00a0\ny\u2003\nz\n\n\n\nend.\n<|endoftext|>\nafter\n" * 30) + "no final newline  "


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_blocks_encode_exactly_like_the_whole_text(tokenizer):
    source = Source(name="tricky", size=len(TRICKY), text=TRICKY)
    blocks = list(document_blocks([source], block_chars=40))
    assert len(blocks) > 20 and blocks[-1][1] and not any(last for _, last in blocks[:-1])
    assert "".join(text for text, _ in blocks) == TRICKY
    streamed = [i for text, _ in blocks for i in tokenizer.encode(text)]
    assert streamed == tokenizer.encode(TRICKY)


def test_doc_separator_splits_files(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("one\n---\ntwo\nlines\n---\n---\nthree", encoding="utf-8")
    docs, current = [], ""
    for text, last in document_blocks([Source(name="docs", size=0, path=path)], separator="---"):
        current += text
        if last:
            docs.append(current)
            current = ""
    assert docs == ["one\n", "two\nlines\n", "three"]


def test_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfHello\nworld")
    source = Source(name="bom", size=0, path=path)
    assert [text for text, _ in document_blocks([source])] == ["Hello\nworld"]
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastgpt", "prepare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_prepare_directory(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    files = {
        "a.txt": "The first document. " * 300,
        "b/c.md": "# Second\n\nUnicode: 東京 😀 — naïve\r\n" * 100,
        "b/d.txt": TRICKY,
        "z.md": "last one",
    }
    for name, text in files.items():
        (corpus / name).write_text(text, encoding="utf-8", newline="")
    (corpus / "ignored.json").write_text("{}")
    (corpus / ".hidden.txt").write_text("hidden files are skipped")
    out = tmp_path / "out"
    assert cli_main(["prepare", str(corpus), "--out", str(out), "--val-fraction", "0.2", "--shard-tokens", "1000",
                     "--workers", "2"]) == 0

    expected = tokenizer.encode("<|endoftext|>".join(files[name] for name in sorted(files)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokens"] == len(expected) and meta["documents"] == 4
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    assert [Path(s["name"]).relative_to(corpus).as_posix() for s in meta["sources"]] == sorted(files)
    assert [s["sha256"] for s in meta["sources"]] == [
        hashlib.sha256((corpus / name).read_bytes()).hexdigest() for name in sorted(files)]
    n_val = round(0.2 * len(expected))
    assert meta["splits"]["val"]["tokens"] == n_val
    on_disk = {}
    for split in ("train", "val"):
        entries = meta["splits"][split]["shards"]
        assert [e["file"] for e in entries] == [f"{split}_{i:03d}.bin" for i in range(len(entries))]
        assert all(0 < e["tokens"] <= 1000 for e in entries)
        on_disk[split] = np.concatenate([np.fromfile(out / e["file"], dtype=np.uint16) for e in entries]).tolist()
    assert on_disk["train"] == expected[:-n_val] and on_disk["val"] == expected[-n_val:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", *(e["file"] for s in ("train", "val") for e in meta["splits"][s]["shards"])])

    # Running again into the same folder replaces the old shards instead of mixing them in.
    assert cli_main(["prepare", str(corpus / "z.md"), "--out", str(out), "--val-fraction", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_000.bin"]
    assert np.fromfile(out / "train_000.bin", dtype=np.uint16).tolist() == tokenizer.encode("last one")


def test_non_utf8_file_is_one_line_error(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("fine text\n")
    bad.write_bytes("first line\nsecond: caf".encode() + b"\xe9 au lait\n")
    result = run_cli(good, bad, "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0] and "byte offset 22" in lines[0] and "line 2" in lines[0]
    assert not (tmp_path / "out").exists()


def test_empty_corpus_is_one_line_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "also-empty.md").write_text("")
    result = run_cli(tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "empty corpus" in result.stderr


def test_argument_errors(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("some words")
    assert cli_main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    assert cli_main(["prepare", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o"), "--val-fraction", "1"]) == 2
    assert "--val-fraction must be in [0, 1), got 1.0" in capsys.readouterr().err
    assert cli_main(["prepare", "--out", str(tmp_path / "o")]) == 2
    assert "no INPUT given" in capsys.readouterr().err


def test_prepare_with_a_trained_bpe(tmp_path):
    from fastgpt.bpe import BPETokenizer
    from fastgpt.data import TokenShards
    texts = ["to be or not to be, that is the question\n" * 20, "whether 'tis nobler in the mind to suffer\n" * 20]
    bpe = BPETokenizer.train("".join(texts), vocab_size=300)
    bpe.save(tmp_path / "bpe")
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    out = tmp_path / "out"
    assert cli_main(["prepare", str(tmp_path / "0.txt"), str(tmp_path / "1.txt"), "--out", str(out),
                     "--tokenizer", str(tmp_path / "bpe"), "--val-fraction", "0"]) == 0
    train = TokenShards(out, "train")
    assert (train.vocab_size, train.eot_id) == (bpe.vocab_size, bpe.eot_id)
    assert train.meta["tokenizer"] == str((tmp_path / "bpe").resolve())
    assert train.tokens(0, len(train)).tolist() == bpe.encode("<|endoftext|>".join(texts))
