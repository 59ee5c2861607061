"""Byte-level BPE from scratch: train a vocabulary, encode, decode, save, load.

This is the algorithm behind GPT-2's tokenizer, written out to be read:

1. Special tokens (``<|endoftext|>``) are cut out of the text first, so they are
   never split or merged and always map to their own id.
2. The rest is pre-tokenized with GPT-2's regex into "words" (letter runs with
   their leading space, digit runs, punctuation runs, whitespace), so merges
   never cross a word boundary.
3. Every word starts as its UTF-8 bytes: 256 base tokens cover any text.
4. Training repeatedly merges the most frequent adjacent pair of tokens into a
   new token. Encoding replays those merges, lowest rank (earliest) first.

`fastgpt.tokenizer.Tokenizer` (tiktoken) is the fast production path;
`BPETokenizer.from_gpt2_files()` loads OpenAI's vocabulary into this code and
gives the same ids, which the tests check against an independent implementation.
"""
from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

import regex

from .errors import FastGPTError
from .gpt2_vocab import ENDOFTEXT, EOT_ID, GPT2_SPLIT_PATTERN, bytes_to_unicode, load_gpt2_vocab
from .weights.atomic import replace_file

Pair = tuple[int, int]

VOCAB_FILE = "encoder.json"  # token (bytes shown through bytes_to_unicode) -> id, as OpenAI writes it
MERGES_FILE = "vocab.bpe"  # one merge per line, in rank order, as OpenAI writes it
SPECIALS_FILE = "special_tokens.json"  # special token string -> id
MERGES_HEADER = "#version: 0.2"


class BPETokenizer:
    """Byte-level BPE tokenizer: `vocab` maps id -> token bytes, `merges` lists (left id, right id) by rank."""

    def __init__(self, vocab: dict[int, bytes], merges: list[Pair], special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_SPLIT_PATTERN):
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self._splitter = regex.compile(pattern)
        self._bytes_to_id = {b: i for i, b in self.vocab.items()}
        # The 256 single bytes must all be tokens, or some text could not be encoded.
        missing = [b for b in range(256) if bytes([b]) not in self._bytes_to_id]
        if missing:
            raise FastGPTError(f"BPE vocabulary lacks {len(missing)} single-byte tokens (first: byte {missing[0]})")
        self._byte_ids = [self._bytes_to_id[bytes([b])] for b in range(256)]
        # pair -> (rank, merged id): encoding merges the lowest-rank pair first.
        self._merge_of: dict[Pair, tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            merged = self._bytes_to_id.get(self.vocab[a] + self.vocab[b])
            if merged is None:
                raise FastGPTError(f"BPE merge {rank} produces a token missing from the vocabulary")
            self._merge_of[(a, b)] = (rank, merged)
        self._special_ids = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._special_splitter = _special_splitter(self.special_tokens) if self.special_tokens else None
        self._cache: dict[str, list[int]] = {}
        self.eot_id = self.special_tokens.get(ENDOFTEXT)
        self.vocab_size = max([*self.vocab, *self._special_ids]) + 1

    # ----------------------------------------------------------------- training
    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens=(ENDOFTEXT,), pattern: str = GPT2_SPLIT_PATTERN,
              verbose: bool = False) -> "BPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text`.

        Ties between equally frequent pairs go to the smallest (left id, right id),
        so training is deterministic. Stops early when every word is a single token.
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise FastGPTError(f"vocab_size {vocab_size} is below 256 bytes + {len(special_tokens)} special tokens")
        splitter = regex.compile(pattern)
        chunks = _split_on_specials(text, special_tokens)
        word_counts = Counter(w for chunk in chunks[::2] for w in splitter.findall(chunk))
        words = [list(w.encode("utf-8")) for w in word_counts]
        counts = list(word_counts.values())

        # How often each adjacent pair occurs (weighted by word count), and in which words.
        pair_counts: dict[Pair, int] = defaultdict(int)
        pair_words: dict[Pair, set[int]] = defaultdict(set)
        for w, (word, count) in enumerate(zip(words, counts, strict=True)):
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] += count
                pair_words[pair].add(w)
        # Max-heap of (-count, pair); entries go stale when counts change and are skipped on pop.
        heap = [(-c, pair) for pair, c in pair_counts.items()]
        heapq.heapify(heap)

        vocab = {i: bytes([i]) for i in range(256)}
        merges: list[Pair] = []
        while len(merges) < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            if pair_counts.get(pair) != -neg:
                continue  # stale entry: the count changed after this was pushed
            new_id = len(vocab)
            vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
            merges.append(pair)
            if verbose:
                print(f"merge {len(merges)}/{n_merges}: {vocab[pair[0]]!r} + {vocab[pair[1]]!r} (count {-neg})")
            # Only the words containing the pair change: retract their old pairs, merge, add the new pairs.
            before: dict[Pair, int] = {}
            for w in pair_words.pop(pair):
                word, count = words[w], counts[w]
                for old in zip(word, word[1:], strict=False):
                    before.setdefault(old, pair_counts[old])
                    pair_counts[old] -= count
                word = words[w] = _merge(word, pair, new_id)
                for new in zip(word, word[1:], strict=False):
                    before.setdefault(new, pair_counts[new])
                    pair_counts[new] += count
                    pair_words[new].add(w)
            for p, old_count in before.items():
                c = pair_counts[p]
                if c <= 0:
                    del pair_counts[p]
                    pair_words.pop(p, None)
                elif c != old_count:
                    heapq.heappush(heap, (-c, p))
        specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        return cls(vocab, merges, specials, pattern)

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text map to their ids."""
        ids: list[int] = []
        for i, chunk in enumerate(_split_on_specials(text, self.special_tokens, self._special_splitter)):
            if i % 2:
                ids.append(self.special_tokens[chunk])
            else:
                for word in self._splitter.findall(chunk):
                    ids.extend(self._encode_word(word))
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Same interface as `Tokenizer.encode_batch`; pure Python gains nothing from threads."""
        return [self.encode(t) for t in texts]

    def _encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids = [self._byte_ids[b] for b in word.encode("utf-8")]
        while len(ids) > 1:
            # The pair merged earliest in training goes first; all its occurrences at once.
            best = min(zip(ids, ids[1:], strict=False), key=lambda p: self._merge_of.get(p, _NO_MERGE)[0])
            found = self._merge_of.get(best)
            if found is None:
                break
            ids = _merge(ids, best, found[1])
        if len(self._cache) >= 200_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def decode_bytes(self, ids) -> bytes:
        out = []
        for i in ids:
            i = int(i)
            token = self.vocab.get(i)
            if token is None:
                token = self._special_ids.get(i)
                if token is None:
                    raise FastGPTError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
            out.append(token)
        return b"".join(out)

    def decode(self, ids) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    # ----------------------------------------------------------- saving/loading
    def save(self, directory) -> Path:
        """Write `encoder.json`, `vocab.bpe` (OpenAI's formats) and `special_tokens.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        show = _show_bytes
        encoder = {show(self.vocab[i]): i for i in sorted(self.vocab)}
        merges = [f"{show(self.vocab[a])} {show(self.vocab[b])}" for a, b in self.merges]
        _write_text(directory / VOCAB_FILE, json.dumps(encoder, ensure_ascii=False, indent=0) + "\n")
        _write_text(directory / MERGES_FILE, "\n".join([MERGES_HEADER, *merges]) + "\n")
        specials = {"special_tokens": self.special_tokens, "pattern": self.pattern}
        _write_text(directory / SPECIALS_FILE, json.dumps(specials, ensure_ascii=False, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory) -> "BPETokenizer":
        """Read what `save` wrote (or OpenAI's `encoder.json` + `vocab.bpe` beside a `special_tokens.json`)."""
        directory = Path(directory)
        for name in (VOCAB_FILE, MERGES_FILE):
            if not (directory / name).is_file():
                raise FastGPTError(f"{directory / name}: missing BPE file")
        encoder = _read_json(directory / VOCAB_FILE)
        unshow = {c: b for b, c in bytes_to_unicode().items()}
        specials_path = directory / SPECIALS_FILE
        config = _read_json(specials_path) if specials_path.is_file() else {}
        special_tokens = config.get("special_tokens", {ENDOFTEXT: encoder[ENDOFTEXT]} if ENDOFTEXT in encoder else {})
        vocab, token_id = {}, {}
        for token, i in encoder.items():
            if token in special_tokens:
                continue
            try:
                raw = bytes(unshow[c] for c in token)
            except KeyError:
                raise FastGPTError(f"{directory / VOCAB_FILE}: token {token!r} is not in byte-level form") from None
            vocab[i] = raw
            token_id[token] = i
        merges = []
        lines = (directory / MERGES_FILE).read_text(encoding="utf-8").split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or parts[0] not in token_id or parts[1] not in token_id:
                raise FastGPTError(f"{directory / MERGES_FILE}:{lineno}: expected two known tokens, got {line!r}")
            merges.append((token_id[parts[0]], token_id[parts[1]]))
        return cls(vocab, merges, special_tokens, config.get("pattern", GPT2_SPLIT_PATTERN))

    @classmethod
    def from_gpt2_files(cls) -> "BPETokenizer":
        """OpenAI's GPT-2 vocabulary and merges (sha256-checked): encodes exactly like GPT-2."""
        byte_vocab, byte_merges = load_gpt2_vocab()
        vocab = {i: b for b, i in byte_vocab.items()}
        merges = [(byte_vocab[a], byte_vocab[b]) for a, b in byte_merges]
        return cls(vocab, merges, {ENDOFTEXT: EOT_ID})


_NO_MERGE = (float("inf"), -1)


def _merge(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """`ids` with every non-overlapping occurrence of `pair`, left to right, replaced by `new_id`."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _special_splitter(special_tokens) -> regex.Pattern:
    """A pattern whose split keeps the special tokens, longest first (so a prefix never wins)."""
    alternatives = "|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
    return regex.compile(f"({alternatives})")


def _split_on_specials(text: str, special_tokens, splitter=None) -> list[str]:
    """[plain, special, plain, special, ..., plain]: odd positions are special tokens."""
    if not special_tokens:
        return [text]
    if splitter is None:
        splitter = _special_splitter(special_tokens)
    return splitter.split(text)


def _show_bytes(raw: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in raw)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastGPTError(f"{path}: not valid JSON ({err})") from None


def _write_text(path: Path, text: str) -> None:
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
