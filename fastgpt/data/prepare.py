"""Text files -> token shards: the work behind `fastgpt prepare`.

The corpus is a list of documents (by default one per file, in the order the
inputs are given; a directory contributes its `*.txt`/`*.md` files in sorted
path order). Their tokens are written as one stream with `<|endoftext|>`
between documents, so the model learns where one text ends and the next
begins. The validation split is the last `val_fraction` of that stream (by
token position, so it is deterministic and needs no shuffling); the shard
that holds the cut is split in two.

Large files are streamed: read line by line, cut into blocks at line breaks
where GPT-2's pre-tokenizer would split anyway (a newline between two
non-space characters), so encoding block by block gives exactly the ids of
encoding the whole file at once. Blocks are encoded in batches over threads.
Everything is written into a temporary folder inside the output directory and
moved into place at the end; `meta.json` comes last, so its presence means
the shards are complete.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import regex

from ..errors import FastGPTError
from .shards import FORMAT, TOKEN_DTYPE, ShardWriter, shard_name, write_meta

TEXT_SUFFIXES = (".txt", ".md")
BLOCK_CHARS = 1 << 18  # ~256k characters per encode call
SPLIT_RULE = "val is the last val_fraction of the token stream (documents in input order, joined by eot)"
_SHARD_FILE = re.compile(r"^(train|val)_\d{3,}\.bin$")
_SPACE = regex.compile(r"\s")


@dataclass
class Source:
    """One input: a file on disk, or text already in memory (a packaged corpus)."""
    name: str
    size: int  # bytes of UTF-8
    path: Path | None = None
    text: str | None = None
    sha256: str | None = None

    def lines(self) -> Iterator[tuple[str, int]]:
        """(line with its newline, its size in bytes); a file's sha256 is computed on the way.

        A file is read a line at a time (a file without newlines is one line, read whole).
        """
        if self.text is not None:
            start = 0
            while start < len(self.text):
                end = self.text.find("\n", start)
                end = len(self.text) if end < 0 else end + 1
                line = self.text[start:end]
                yield line, len(line.encode("utf-8"))
                start = end
            return
        digest, offset = hashlib.sha256(), 0
        with open(self.path, "rb") as f:
            for raw in f:
                digest.update(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise FastGPTError(f"{self.path}: not UTF-8 at byte offset {offset + err.start} "
                                       f"(line {_line_number(self.path, offset)}: {err.reason})") from None
                if offset == 0 and line.startswith("\ufeff"):
                    line = line[1:]  # a byte-order mark is an encoding marker, not text
                offset += len(raw)
                yield line, len(raw)
        self.sha256 = digest.hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "bytes": self.size, "sha256": self.sha256}


def _line_number(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def collect_inputs(inputs: Iterable) -> list[Source]:
    """Files as given, directories walked for *.txt/*.md (hidden entries skipped), sorted, without repeats."""
    sources, seen = [], set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise FastGPTError(f"{path}: directory has no {' or '.join('*' + s for s in TEXT_SUFFIXES)} files")
        elif path.is_file():
            found = [path]
        else:
            raise FastGPTError(f"{path}: no such file or directory")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(Source(name=str(p), size=p.stat().st_size, path=p))
    return sources


def _safe_cut(previous: str, line: str) -> bool:
    """True when GPT-2's pre-tokenizer splits between `previous` and `line` whatever surrounds them.

    That holds after a newline that follows a non-space character and precedes one:
    whitespace runs (which the regex treats specially at the end of text) cannot
    straddle the cut, and no other token class contains a newline.
    """
    return (len(previous) >= 2 and previous[-1] == "\n" and not _is_space(previous[-2])
            and bool(line) and not _is_space(line[0]))


def _is_space(ch: str) -> bool:
    # str.isspace and the regex's \s disagree on a few control characters: count either as space.
    return ch.isspace() or _SPACE.match(ch) is not None


def document_blocks(sources: list[Source], separator: str | None = None, block_chars: int = BLOCK_CHARS,
                    progress=None) -> Iterator[tuple[str, bool]]:
    """(text block, ends a document) for every document of every source; empty documents are skipped.

    With `separator`, a line consisting of exactly that string ends a document
    inside a file (the line itself is dropped).
    """
    for source in sources:
        block, size, previous, read = [], 0, "", 0
        for line, nbytes in source.lines():
            read += nbytes
            if progress is not None and read >= block_chars:
                progress.update(read)
                read = 0
            if separator is not None and line.rstrip("\r\n") == separator:
                if block:
                    yield "".join(block), True
                block, size, previous = [], 0, ""
                continue
            if size >= block_chars and _safe_cut(previous, line):
                yield "".join(block), False
                block, size = [], 0
            block.append(line)
            size += len(line)
            previous = line
        if progress is not None:
            progress.update(read)
        if block:
            yield "".join(block), True


def encode_to_shards(blocks: Iterable[tuple[str, bool]], tokenizer, writer: ShardWriter, workers: int = 1,
                     batch_blocks: int | None = None) -> int:
    """Encode the blocks (in batches, over threads) into `writer`, eot between documents; returns documents."""
    batch_blocks = batch_blocks or max(2, 2 * workers)
    eot = np.array([tokenizer.eot_id])
    documents, in_document = 0, False
    texts, ends = [], []

    def flush():
        nonlocal documents, in_document
        for ids, last in zip(tokenizer.encode_batch(texts, num_threads=workers), ends, strict=True):
            if not in_document:
                if documents:
                    writer.write(eot)
                documents += 1
                in_document = True
            writer.write(np.array(ids, dtype=np.int64))
            in_document = not last
        texts.clear()
        ends.clear()

    for text, last in blocks:
        texts.append(text)
        ends.append(last)
        if len(texts) >= batch_blocks:
            flush()
    flush()
    return documents


def _split_tail(directory: Path, shards: list[dict], val_tokens: int) -> tuple[list[dict], list[dict]]:
    """Rename the stream's shards to train_*/val_* so val holds the last `val_tokens` tokens."""
    total = sum(s["tokens"] for s in shards)
    cut = total - val_tokens
    train, val, start = [], [], 0
    for shard in shards:
        path, n = directory / shard["file"], shard["tokens"]
        parts = [(train, "train", 0, min(n, max(cut - start, 0))), (val, "val", min(n, max(cut - start, 0)), n)]
        whole = [p for p in parts if p[3] > p[2]]
        if len(whole) == 1:  # the shard lies on one side of the cut: just rename it
            target, split, _, _ = whole[0]
            name = shard_name(split, len(target))
            os.replace(path, directory / name)
            target.append({"file": name, "tokens": n})
        else:  # the cut falls inside: copy each side into its own file
            tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
            for target, split, lo, hi in whole:
                name = shard_name(split, len(target))
                tokens[lo:hi].tofile(directory / name)
                target.append({"file": name, "tokens": hi - lo})
            del tokens
            path.unlink()
        start += n
    return train, val


def prepare(sources: list[Source], out, tokenizer=None, tokenizer_name: str = "gpt2", val_fraction: float = 0.1,
            shard_tokens: int = 100_000_000, workers: int | None = None, separator: str | None = None,
            show_progress: bool | None = None) -> dict:
    """Tokenize `sources` into shards under `out`; returns the meta written to `out/meta.json`."""
    if not 0 <= val_fraction < 1:
        raise FastGPTError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise FastGPTError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if not sources:
        raise FastGPTError("empty corpus: no input files")
    if tokenizer is None:
        from ..tokenizer import Tokenizer
        tokenizer = Tokenizer()
    if tokenizer.eot_id is None:
        raise FastGPTError(f"tokenizer {tokenizer_name} has no <|endoftext|> token to separate documents")
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise FastGPTError(f"tokenizer {tokenizer_name}: vocab_size {tokenizer.vocab_size} does not fit uint16 shards")
    workers = max(1, workers or os.cpu_count() or 1)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FastGPTError(f"--out {out}: exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out, prefix=".prepare-"))
    finished = False
    try:
        from tqdm import tqdm
        with tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True, desc="tokenizing",
                  disable=None if show_progress is None else not show_progress) as bar:
            writer = ShardWriter(work, "stream", shard_tokens)
            try:
                documents = encode_to_shards(document_blocks(sources, separator, progress=bar), tokenizer, writer,
                                             workers)
            finally:
                shards = writer.close()
        total = sum(s["tokens"] for s in shards)
        if total == 0:
            raise FastGPTError(f"empty corpus: {len(sources)} input file(s) hold no text"
                               + (f" ({sources[0].name})" if len(sources) == 1 else ""))
        val_tokens = int(round(total * val_fraction))
        if val_fraction > 0:
            val_tokens = max(val_tokens, 1)
        if val_tokens >= total:
            raise FastGPTError(f"corpus of {total} tokens is too small to hold out --val-fraction {val_fraction}")
        train, val = _split_tail(work, shards, val_tokens)
        meta = {
            "format": FORMAT,
            "version": 1,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "tokenizer": tokenizer_name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "tokens": total,
            "documents": documents,
            "doc_separator": separator,
            "val_fraction": val_fraction,
            "split_rule": SPLIT_RULE,
            "splits": {"train": {"tokens": total - val_tokens, "shards": train},
                       "val": {"tokens": val_tokens, "shards": val}},
            "sources": [s.describe() for s in sources],
        }
        # Replace an earlier run's output: meta first (its absence marks the folder incomplete), then shards.
        (out / "meta.json").unlink(missing_ok=True)
        for old in out.iterdir():
            if _SHARD_FILE.match(old.name):
                old.unlink()
        for entry in (*train, *val):
            os.replace(work / entry["file"], out / entry["file"])
        write_meta(out, meta)
        finished = True
        return meta
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not finished and not any(out.iterdir()):
            out.rmdir()  # leave no empty folder behind after an error
