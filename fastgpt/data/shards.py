"""Token shards on disk: flat uint16 files plus a `meta.json` that describes them.

A prepared corpus is a directory of `train_000.bin, train_001.bin, ..., val_000.bin, ...`,
each a headerless array of uint16 token ids (GPT-2's 50,257 ids fit in 16 bits),
and `meta.json` with every shard's token count. Reading memory-maps the files,
so a corpus larger than RAM costs only the pages actually touched. A split is
read as one continuous token stream: windows may straddle two shards.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FastGPTError

TOKEN_DTYPE = np.uint16
META_FILE = "meta.json"
FORMAT = "fastgpt-token-shards"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:03d}.bin"


class ShardWriter:
    """Appends a token stream to `<split>_000.bin, <split>_001.bin, ...` of at most `shard_tokens` each.

    Tokens go straight to the open file, so memory stays at one incoming batch.
    """

    def __init__(self, directory, split: str, shard_tokens: int):
        if shard_tokens < 1:
            raise FastGPTError(f"shard_tokens must be at least 1, got {shard_tokens}")
        self.directory, self.split, self.shard_tokens = Path(directory), split, shard_tokens
        self.shards: list[dict] = []  # {"file": name, "tokens": n} of finished shards
        self._file = None
        self._in_shard = 0

    def write(self, ids) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
            raise FastGPTError(f"token id {int(ids.max())} does not fit the shards' {np.dtype(TOKEN_DTYPE).name}")
        ids = ids.astype(TOKEN_DTYPE, copy=False)
        while ids.size:
            if self._file is None:
                self._file = open(self.directory / shard_name(self.split, len(self.shards)), "wb")
                self._in_shard = 0
            take = min(ids.size, self.shard_tokens - self._in_shard)
            self._file.write(ids[:take].tobytes())
            self._in_shard += take
            ids = ids[take:]
            if self._in_shard == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        self._file.close()
        self.shards.append({"file": shard_name(self.split, len(self.shards)), "tokens": self._in_shard})
        self._file = None

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish_shard()
        return self.shards

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + (self._in_shard if self._file is not None else 0)


def read_meta(directory) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FastGPTError(f"{path}: missing; create the shards with `fastgpt prepare INPUT --out {directory}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastGPTError(f"{path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise FastGPTError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


@dataclass(frozen=True)
class ShardPosition:
    """Where a sequential reader stands: token `offset` within shard `shard`, in pass `epoch`."""
    shard: int = 0
    offset: int = 0
    epoch: int = 0

    def to_dict(self) -> dict:
        return {"shard": self.shard, "offset": self.offset, "epoch": self.epoch}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardPosition":
        return cls(int(d["shard"]), int(d["offset"]), int(d.get("epoch", 0)))


class TokenShards:
    """One split of a prepared corpus, memory-mapped: `len()` tokens, random or sequential batches."""

    def __init__(self, directory, split: str = "train"):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        if split not in self.meta["splits"]:
            raise FastGPTError(f"{self.directory / META_FILE}: no split {split!r} (has {sorted(self.meta['splits'])})")
        self.split = split
        self.vocab_size = int(self.meta["vocab_size"])
        self.eot_id = self.meta.get("eot_id")
        self.files, self.arrays, sizes = [], [], []
        for entry in self.meta["splits"][split]["shards"]:
            path = self.directory / entry["file"]
            expected = int(entry["tokens"]) * np.dtype(TOKEN_DTYPE).itemsize
            if not path.is_file():
                raise FastGPTError(f"{path}: shard listed in {META_FILE} is missing")
            if path.stat().st_size != expected:
                raise FastGPTError(f"{path}: {path.stat().st_size} bytes, {META_FILE} says {expected}")
            self.files.append(path)
            self.arrays.append(np.memmap(path, dtype=TOKEN_DTYPE, mode="r") if expected else np.zeros(0, TOKEN_DTYPE))
            sizes.append(int(entry["tokens"]))
        # global index of each shard's first token
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split as one array, read across shard boundaries."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) outside the {len(self)}-token {self.split} split")
        parts = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            begin = start - int(self.starts[shard])
            end = min(stop, int(self.starts[shard + 1])) - int(self.starts[shard])
            parts.append(self.arrays[shard][begin:end])
            start += end - begin
            shard += 1
        if not parts:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def _need(self, n: int, what: str) -> None:
        if len(self) < n:
            raise FastGPTError(f"{self.directory}: the {self.split} split has {len(self)} tokens; {what} needs {n}")

    def sample_batch(self, batch_size: int, context_length: int, generator: torch.Generator | None = None,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, context_length) int64, from uniformly random positions."""
        self._need(context_length + 1, f"a window of context_length {context_length}")
        starts = torch.randint(len(self) - context_length, (batch_size,), generator=generator).tolist()
        rows = np.stack([self.tokens(s, s + context_length + 1) for s in starts]).astype(np.int64)
        return _pair(torch.from_numpy(rows), device)

    def batches(self, batch_size: int, context_length: int, position: ShardPosition | dict | None = None,
                loop: bool = True, device=None) -> "SequentialBatches":
        """Disjoint consecutive windows in file order, resumable from `position` (see `SequentialBatches`)."""
        return SequentialBatches(self, batch_size, context_length, position, loop, device)

    def position_of(self, index: int) -> ShardPosition:
        """(shard, offset) of global token `index`; the end of the split is the end of the last shard."""
        shard = min(int(np.searchsorted(self.starts, index, side="right")) - 1, max(len(self.arrays) - 1, 0))
        return ShardPosition(shard, index - int(self.starts[shard]))

    def index_of(self, position: ShardPosition) -> int:
        n_shards = len(self.arrays)
        known = 0 <= position.shard < n_shards
        size = int(self.starts[position.shard + 1] - self.starts[position.shard]) if known else -1
        if not 0 <= position.offset <= size:
            raise FastGPTError(f"{self.directory}: position {position.to_dict()} is outside the {self.split} shards")
        return int(self.starts[position.shard]) + position.offset


class SequentialBatches:
    """Iterates batches of B rows of T consecutive tokens; each batch reads B*T+1 tokens and advances B*T.

    `position` (shard, offset, epoch) is where the next batch starts: save it
    with a checkpoint (`state_dict()`) and pass it back to resume exactly there.
    With `loop`, the stream wraps to the start (epoch + 1) when fewer than
    B*T+1 tokens remain; without, iteration stops there.
    """

    def __init__(self, shards: TokenShards, batch_size: int, context_length: int,
                 position: ShardPosition | dict | None = None, loop: bool = True, device=None):
        if batch_size < 1 or context_length < 1:
            raise FastGPTError(f"batch_size and context_length must be at least 1, got {batch_size}, {context_length}")
        self.shards, self.batch_size, self.context_length = shards, batch_size, context_length
        self.loop, self.device = loop, device
        self.span = batch_size * context_length
        shards._need(self.span + 1, f"a batch of {batch_size} x {context_length}")
        self.load_state_dict(position or ShardPosition())

    @property
    def position(self) -> ShardPosition:
        where = self.shards.position_of(self._index)
        return ShardPosition(where.shard, where.offset, self._epoch)

    def state_dict(self) -> dict:
        return self.position.to_dict()

    def load_state_dict(self, position: ShardPosition | dict) -> None:
        if isinstance(position, dict):
            position = ShardPosition.from_dict(position)
        self._index = self.shards.index_of(position)
        self._epoch = position.epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._index + self.span + 1 > len(self.shards):
            if not self.loop:
                raise StopIteration
            self._index, self._epoch = 0, self._epoch + 1
        flat = self.shards.tokens(self._index, self._index + self.span + 1).astype(np.int64)
        self._index += self.span
        flat = torch.from_numpy(flat)
        x = flat[:-1].view(self.batch_size, self.context_length)
        y = flat[1:].view(self.batch_size, self.context_length)
        return _to(x, self.device), _to(y, self.device)


def _pair(rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    return _to(rows[:, :-1], device), _to(rows[:, 1:], device)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    if device is None or torch.device(device).type == "cpu":
        return t.contiguous()
    return t.pin_memory().to(device, non_blocking=True)


def write_meta(directory, meta: dict) -> None:
    """Write meta.json atomically: it is written last, so its presence means the shards are complete."""
    path = Path(directory) / META_FILE
    tmp = path.with_name(f".{META_FILE}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
