"""Where training batches come from, as a pure function of (seed, step).

Batch `s` is computed from the seed and `s` alone, never from a running
iterator, so a resumed run sees exactly the batches the uninterrupted one
would have, and under DDP every process computes the same global batch and
takes its own rows of it (rank-strided micro-batches). The global batch has
micro_batch * accum * world rows; micro-step k of rank r is micro-batch
k * world + r, so 1 process with accum=2 and 2 processes with accum=1 see the
same sequences.

Two samplers:
  "random": windows starting anywhere (nanoGPT style; good for large corpora);
  "epoch":  non-overlapping windows, reshuffled each epoch (the book's loader;
            lets small data sets be trained for an exact number of epochs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bpe import BPETokenizer
from ..corpus import shakespeare_text
from ..data import TokenShards
from ..errors import FastGPTError
from ..tokenizer import Tokenizer

_EVAL_SEED = 0x5EED_E7A1  # eval windows are fixed per run, independent of the training seed's stream


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded deterministically from integers."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class TokenSplit:
    """One split's tokens with window sampling: a 1-D numpy array in memory, or
    memory-mapped shards (`fastgpt.data.TokenShards`, read a window at a time)."""

    def __init__(self, tokens, name: str):
        self.tokens = tokens
        self.name = name

    def __len__(self) -> int:
        return len(self.tokens)

    def check_context(self, context_length: int, what: str) -> None:
        if len(self.tokens) < context_length + 1:
            raise FastGPTError(
                f"{what}: the {self.name} split has {len(self.tokens)} tokens, fewer than the context "
                f"length + 1 ({context_length + 1}); use a shorter --context-length or more data")

    def windows(self, offsets: torch.Tensor, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (len(offsets), T) starting at each offset."""
        if isinstance(self.tokens, np.ndarray):
            index = offsets.numpy()[:, None] + np.arange(context_length + 1)[None, :]
            rows = self.tokens[index]
        else:
            rows = np.stack([self.tokens.tokens(o, o + context_length + 1) for o in offsets.tolist()])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def random_offsets(self, count: int, context_length: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.tokens) - context_length, (count,), generator=generator)

    def unigram_entropy(self) -> float | None:
        """Loss (nats) of always predicting the split's token frequencies: the bar a model must beat."""
        if not isinstance(self.tokens, np.ndarray):
            return None  # shards: not worth a pass over a large corpus
        counts = np.bincount(self.tokens).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def n_windows(self, context_length: int) -> int:
        return (len(self.tokens) - 1) // context_length


@dataclass
class BatchPlan:
    """Which rows each process reads at each step."""
    train: TokenSplit
    val: TokenSplit
    context_length: int
    micro_batch: int
    accum_steps: int
    world_size: int
    rank: int
    seed: int
    sampling: str = "random"

    @property
    def global_rows(self) -> int:
        return self.micro_batch * self.accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_rows * self.context_length

    def steps_per_epoch(self) -> float:
        if self.sampling == "epoch":
            return self.train.n_windows(self.context_length) / self.global_rows
        return len(self.train) / self.tokens_per_step

    def global_offsets(self, step: int) -> torch.Tensor:
        T, G = self.context_length, self.global_rows
        if self.sampling == "random":
            return self.train.random_offsets(G, T, _generator(self.seed, step))
        n = self.train.n_windows(T)
        flat = torch.arange(step * G, (step + 1) * G)
        epochs, positions = flat // n, flat % n
        offsets = torch.empty(G, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            order = torch.randperm(n, generator=_generator(self.seed, 1 << 20, epoch))
            chosen = epochs == epoch
            offsets[chosen] = order[positions[chosen]] * T
        return offsets

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's `accum_steps` micro-batches (x, y) for optimizer step `step`."""
        offsets = self.global_offsets(step)
        out = []
        for k in range(self.accum_steps):
            m = k * self.world_size + self.rank
            rows = offsets[m * self.micro_batch:(m + 1) * self.micro_batch]
            out.append(self.train.windows(rows, self.context_length))
        return out

    def eval_batches(self, split: str, count: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same `count` batches every time it is called (seeded by the split, not the step).

        They are drawn the way training draws: windows starting anywhere for "random"
        sampling; for "epoch" sampling the split's own non-overlapping windows (at
        offsets 0, T, 2T, ..., repeated when fewer than asked), as a data loader over
        fixed chunks would evaluate. With a tiny text this matters: a model that has
        memorised its 18 training windows still fails on windows shifted by a few tokens.
        """
        data = self.train if split == "train" else self.val
        T, wanted = self.context_length, count * batch_size
        if self.sampling == "epoch" and data.n_windows(T) > 0:
            offsets = torch.arange(wanted) % data.n_windows(T) * T
        else:
            offsets = data.random_offsets(wanted, T, _generator(_EVAL_SEED, 0 if split == "train" else 1))
        return [data.windows(offsets[i * batch_size:(i + 1) * batch_size], self.context_length)
                for i in range(count)]


# ---------------------------------------------------------------------- sources
def tokenize_text(text: str, source: str, tokenizer=None) -> np.ndarray:
    """Token ids of `text` as uint16 (GPT-2's tokenizer by default)."""
    if tokenizer is None:
        tokenizer = Tokenizer()
    if not text.strip():
        raise FastGPTError(f"{source}: no text to train on (empty)")
    return np.asarray(tokenizer.encode(text), dtype=np.uint16)


def split_tokens(tokens: np.ndarray, val_fraction: float, source: str) -> tuple[TokenSplit, TokenSplit]:
    """First (1 - val_fraction) of the tokens to train, the tail to validate."""
    n_val = int(len(tokens) * val_fraction)
    if n_val < 2 or len(tokens) - n_val < 2:
        raise FastGPTError(f"{source}: only {len(tokens)} tokens, too few to split into train and val")
    return TokenSplit(tokens[:-n_val], "train"), TokenSplit(tokens[-n_val:], "val")


def text_tokenizer(spec: str, train_text: str, saved: Path | None = None):
    """The run's own tokenizer for `spec` "bpe:VOCAB" or a BPE directory (see TrainConfig.tokenizer).

    "bpe:VOCAB" trains fastgpt's from-scratch BPE on the train split only (so the
    validation text stays unseen); training is deterministic, but a resumed run
    loads the copy its checkpoint saved (`saved`) rather than relearning it.
    """
    if saved is not None:
        return BPETokenizer.load(saved)
    if spec.startswith("bpe:"):
        return BPETokenizer.train(train_text, int(spec[4:]))
    if not Path(spec).is_dir():
        raise FastGPTError(f"--tokenizer: {spec!r} is neither gpt2, bpe:VOCAB nor a directory written by "
                           f"BPETokenizer.save")
    return BPETokenizer.load(spec)


def text_splits(text: str, source: str, val_fraction: float, tokenizer: str = "gpt2",
                saved: Path | None = None) -> tuple[TokenSplit, TokenSplit, object | None]:
    """(train split, val split, the run's own tokenizer or None for GPT-2's) of one text.

    GPT-2's tokens are split at a token; a run's own BPE is learned on the text
    before the val tail, so there the text is cut first, at a line start.
    """
    if not text.strip():
        raise FastGPTError(f"{source}: no text to train on (empty)")
    if tokenizer == "gpt2" and saved is None:
        return (*split_tokens(tokenize_text(text, source), val_fraction, source), None)
    cut = int(len(text) * (1.0 - val_fraction))
    line_start = text.find("\n", cut)
    if line_start != -1:
        cut = line_start + 1
    train_text, val_text = text[:cut], text[cut:]
    own = text_tokenizer(tokenizer, train_text, saved)
    if own.vocab_size > np.iinfo(np.uint16).max + 1:
        raise FastGPTError(f"--tokenizer {tokenizer}: vocab_size {own.vocab_size} does not fit uint16 token ids")
    splits = []
    for name, part in (("train", train_text), ("val", val_text)):
        ids = np.asarray(own.encode(part), dtype=np.uint16)
        if len(ids) < 2:
            raise FastGPTError(f"{source}: the {name} split has only {len(ids)} tokens; too little text to split")
        splits.append(TokenSplit(ids, name))
    return splits[0], splits[1], own


def read_text_file(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise FastGPTError(f"--text: no such file {file}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FastGPTError(f"--text: {file} is not UTF-8 text (byte {err.start})") from None


def load_text_file(path: str, val_fraction: float, tokenizer: str = "gpt2", saved: Path | None = None):
    """(train, val, own tokenizer or None) of a UTF-8 text file."""
    return text_splits(read_text_file(path), str(Path(path)), val_fraction, tokenizer, saved)


def load_corpus(name: str, val_fraction: float, tokenizer: str = "gpt2", saved: Path | None = None):
    """(train, val, own tokenizer or None) of a built-in corpus."""
    if name != "shakespeare":
        raise FastGPTError(f"--corpus: unknown corpus {name!r} (choose from: shakespeare)")
    return text_splits(shakespeare_text(), "corpus shakespeare", val_fraction, tokenizer, saved)


def load_shards(directory: str) -> tuple[TokenSplit, TokenSplit]:
    """Token shards written by `fastgpt prepare`, memory-mapped (never loaded whole)."""
    path = Path(directory)
    if not path.is_dir():
        raise FastGPTError(f"--data: no such directory {path}")
    splits = []
    for split in ("train", "val"):
        shards = TokenShards(path, split)
        if len(shards) == 0:
            raise FastGPTError(f"--data: {path} has an empty {split} split")
        splits.append(TokenSplit(shards, split))
    return splits[0], splits[1], shards_tokenizer(path, splits[0].tokens.meta)


def shards_tokenizer(path: Path, meta: dict):
    """The BPE directory `fastgpt prepare --tokenizer DIR` recorded in meta.json, loaded (None: GPT-2's)."""
    name = meta.get("tokenizer", "gpt2")
    if name == "gpt2":
        return None
    if not Path(name).is_dir():
        raise FastGPTError(f"{path / 'meta.json'}: tokenizer {name!r} is not gpt2 or an existing BPE directory")
    return BPETokenizer.load(name)
