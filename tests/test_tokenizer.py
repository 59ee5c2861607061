"""GPT-2 tokenization: the tiktoken path and the from-scratch BPE must both give
exactly the ids of an independent implementation (Hugging Face's), and round-trip."""
import random

import pytest
from conftest import shared_file

from fastgpt.bpe import BPETokenizer
from fastgpt.tokenizer import EOT_ID, Tokenizer, gpt2_file

# Pieces that stress pre-tokenization: scripts, emoji (ZWJ sequences, flags, skin tones),
# whitespace runs, tabs, CRLF, digits, contractions in several cases, and the special token.
PIECES = [
    "Hello, I am a language model. I'm sure you'd say it's fine; we've seen they're right, I'll go.\n",
    "SHOUTING CONTRACTIONS: IT'S, YOU'RE, WE'VE, I'LL, HE'D -- and odd ones: don''t, 's alone, o'clock.\n",
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1,000,000 2026-11-25 0x1F 1e-9 ٣٤٥ ૧૨૩ ½ ² Ⅻ\n",
    "Whitespace:   three spaces,\ttab,\t\ttwo tabs,  \t mixed, trailing   \n\n\n  indented\r\nCRLF line\r\n",
    "中文：我们今天学习如何构建一个大型语言模型。日本語：ひらがなとカタカナ、漢字も。\n",
    "한국어 문장입니다. Русский текст: Съешь же ещё этих мягких французских булок.\n",
    "العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก\n",
    "Ελληνικά: Γειά σου Κόσμε. Ümläüts àccénts ñandú façade naïve coöperate Æsir Øresund ß ﬁ\n",
    "Emoji: 😀😃 👍🏽 👩‍👩‍👧‍👦 🇯🇵🇫🇷 ❤️ ✨🚀 🏳️‍🌈 and text right after😀emoji.\n",
    "Code:\n\tdef f(x):\n\t    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n    if x != y:  pass\n",
    "Punctuation runs: ... !!! ??? ---- ==== <<>> ((([])))) @#$%^&* \\ / | ~ ` ´ « » „ “ ” ‘ ’ …\n",
    "<|endoftext|>",
    "A new document after the special token.<|endoftext|> Another, with a space before it.\n",
    "Control-ish: \x0b vertical tab, \x0c form feed, \u00a0no-break space, \u2003em space, \u200bzero width.\n",
]
MIXED_TEXT = "".join(PIECES * 4) + "   ends with spaces   "


@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    # Positional: transformers 4 names these vocab_file/merges_file, 5 names them vocab/merges.
    hf = transformers.GPT2TokenizerFast(str(gpt2_file("encoder.json")), str(gpt2_file("vocab.bpe")))
    assert len(hf) == 50257  # an ignored keyword would silently leave an empty vocabulary
    return hf


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return Tokenizer()


@pytest.fixture(scope="module")
def scratch_gpt2():
    return BPETokenizer.from_gpt2_files()


def test_known_ids(tiktoken_gpt2, scratch_gpt2):
    for tok in (tiktoken_gpt2, scratch_gpt2):
        assert tok.eot_id == EOT_ID == 50256
        assert tok.vocab_size == 50257
        assert tok.encode("<|endoftext|>") == [50256]
        assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
        assert tok.decode([15496, 11, 314, 716]) == "Hello, I am"


def test_mixed_text_matches_huggingface(hf_gpt2, tiktoken_gpt2, scratch_gpt2):
    assert len(MIXED_TEXT.encode("utf-8")) > 4000
    expected = hf_gpt2(MIXED_TEXT)["input_ids"]
    assert expected.count(EOT_ID) == 4 * 2
    assert tiktoken_gpt2.encode(MIXED_TEXT) == expected
    assert scratch_gpt2.encode(MIXED_TEXT) == expected
    assert tiktoken_gpt2.decode(expected) == MIXED_TEXT
    assert scratch_gpt2.decode(expected) == MIXED_TEXT


@pytest.mark.parametrize("piece", PIECES)
def test_each_piece_matches_huggingface(hf_gpt2, tiktoken_gpt2, scratch_gpt2, piece):
    # Piece by piece so a mismatch points at the construct that broke.
    expected = hf_gpt2(piece)["input_ids"]
    assert tiktoken_gpt2.encode(piece) == expected
    assert scratch_gpt2.encode(piece) == expected


def test_round_trip_random_unicode(tiktoken_gpt2, scratch_gpt2):
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x370, 0x6FF), (0x900, 0x97F), (0x3040, 0x30FF),
              (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x10000, 0x1007F)]
    for _ in range(20):
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 300)))
        for tok in (tiktoken_gpt2, scratch_gpt2):
            assert tok.decode(tok.encode(text)) == text


def test_decode_bytes_keeps_partial_characters(tiktoken_gpt2, scratch_gpt2):
    # "😀" is four UTF-8 bytes split over several byte-level tokens.
    for tok in (tiktoken_gpt2, scratch_gpt2):
        ids = tok.encode("😀")
        assert len(ids) > 1
        assert b"".join(tok.decode_bytes([i]) for i in ids) == "😀".encode("utf-8")


def test_the_verdict_token_count(tiktoken_gpt2, scratch_gpt2):
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    ids = tiktoken_gpt2.encode(text)
    assert len(ids) == 5145
    assert scratch_gpt2.encode(text) == ids
    assert tiktoken_gpt2.decode(ids) == text
