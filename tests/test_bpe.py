"""The from-scratch byte-level BPE trainer: exact merges, round trips, save/load."""
import random
from collections import Counter

import pytest
import regex

from fastgpt.bpe import BPETokenizer
from fastgpt.errors import FastGPTError
from fastgpt.tokenizer import GPT2_SPLIT_PATTERN


def naive_merges(text: str, n_merges: int) -> list[tuple[bytes, bytes]]:
    """Recount every pair before every merge: slow, obviously right, independent of the heap."""
    words = Counter(regex.findall(GPT2_SPLIT_PATTERN, text))
    seqs = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    ids = {bytes([i]): i for i in range(256)}
    merges = []
    for _ in range(n_merges):
        counts = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:], strict=False):
                counts[pair] += words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], ids[p[0]], ids[p[1]]))
        merges.append(best)
        ids[best[0] + best[1]] = len(ids)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def merged_tokens(tok):
    return [(tok.vocab[a], tok.vocab[b]) for a, b in tok.merges]


def test_wikipedia_example_merges():
    # "aaabdaaabac": aa occurs 4 times (overlapping) -> Z; then ab and Za tie at 2, the smaller ids win -> Y;
    # then ZY (twice) -> X. The text becomes X d X a c.
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3 + 1)
    assert merged_tokens(tok) == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert tok.special_tokens == {"<|endoftext|>": 259}
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_merges_weighted_by_word_frequency_and_stop_when_done():
    # Words: "ab" x1, " ab" x2, " cd" x2. Pairs: ab 3, " a" 2, " c" 2, cd 2 -> ab first.
    # Then " c" (32,99) ties " X" (32,256) and cd (99,100): smallest ids (32,99) win; then " ab", then " cd".
    tok = BPETokenizer.train("ab ab ab cd cd", vocab_size=1000)
    assert merged_tokens(tok) == [(b"a", b"b"), (b" ", b"c"), (b" ", b"ab"), (b" c", b"d")]
    assert tok.vocab_size == 256 + 4 + 1  # stopped early: every word is one token
    assert tok.encode("ab ab cd") == [256, 258, 259]


def test_incremental_training_equals_naive_recount():
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "the", "ing", "ö", "中", "s", " ", "  ", "7", "!", "'s", "\n"]
    text = "".join(rng.choice(syllables) for _ in range(6000))
    tok = BPETokenizer.train(text, vocab_size=256 + 120, special_tokens=())
    assert merged_tokens(tok) == naive_merges(text, 120)


def test_round_trip_and_compression():
    text = ("The quick brown fox jumps over the lazy dog. " * 20 + "Über naïve café — 東京 😀\n\t 12345 ") * 3
    tok = BPETokenizer.train(text, vocab_size=400)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 3
    unseen = "Zebra quagga! Ωμέγα, שלום, 🐍🐍 <|endoftext|> tail"  # bytes never seen in training still encode
    ids = tok.encode(unseen)
    assert tok.decode(ids) == unseen
    assert ids.count(tok.eot_id) == 1
    assert max(ids) < tok.vocab_size


def test_special_tokens_are_never_merged():
    text = "x<|endoftext|>x<|endoftext|>x<|endoftext|>"
    tok = BPETokenizer.train(text * 10, vocab_size=300)
    assert all(b"<|" not in tok.vocab[a] + tok.vocab[b] for a, b in tok.merges)
    assert tok.encode("<|endoftext|>") == [tok.eot_id]


def test_save_load_identity(tmp_path):
    text = "Lorem ipsum dolor sit amet, ünïcödé 🙂, consectetur adipiscing elit.\n" * 30
    tok = BPETokenizer.train(text, vocab_size=320, special_tokens=("<|endoftext|>", "<|pad|>"))
    tok.save(tmp_path / "bpe")
    assert {p.name for p in (tmp_path / "bpe").iterdir()} == {"encoder.json", "vocab.bpe", "special_tokens.json"}
    again = BPETokenizer.load(tmp_path / "bpe")
    assert again.vocab == tok.vocab
    assert again.merges == tok.merges
    assert again.special_tokens == tok.special_tokens
    sample = text + "<|pad|><|endoftext|>new"
    assert again.encode(sample) == tok.encode(sample)


def test_bad_arguments_and_files(tmp_path):
    with pytest.raises(FastGPTError, match="vocab_size 256"):
        BPETokenizer.train("abc", vocab_size=256)
    tok = BPETokenizer.train("abcabc", vocab_size=260)
    with pytest.raises(FastGPTError, match="token id 99999"):
        tok.decode([99999])
    tok.save(tmp_path)
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("nonsense\n")
    with pytest.raises(FastGPTError, match=r"vocab\.bpe:\d+:"):
        BPETokenizer.load(tmp_path)
    with pytest.raises(FastGPTError, match="missing BPE file"):
        BPETokenizer.load(tmp_path / "nowhere")
