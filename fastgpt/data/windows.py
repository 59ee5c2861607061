"""Next-token training pairs from one token sequence, by a sliding window.

A window of `context_length` tokens starting at position `i` is the input;
the same window shifted one token right is the target, so the model learns to
predict token t+1 from tokens ..t at every position at once. `stride` is how
far the window moves: stride == context_length gives disjoint windows (each
token is predicted once per epoch), a smaller stride overlaps them (more,
correlated, examples).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import FastGPTError


class NextTokenWindows(Dataset):
    """Item `k` is (ids[s:s+T], ids[s+1:s+T+1]) with s = k * stride, as int64 tensors."""

    def __init__(self, ids, context_length: int, stride: int | None = None):
        stride = context_length if stride is None else stride
        if context_length < 1:
            raise FastGPTError(f"context_length must be at least 1, got {context_length}")
        if stride < 1:
            raise FastGPTError(f"stride must be at least 1, got {stride}")
        if isinstance(ids, np.ndarray):  # e.g. a read-only memmap of uint16 shards: copy to int64
            ids = torch.from_numpy(np.array(ids, dtype=np.int64))
        self.ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if len(self.ids) < context_length + 1:
            raise FastGPTError(f"{len(self.ids)} tokens are too few for one window: context_length "
                               f"{context_length} needs {context_length + 1} (inputs + 1 shifted target)")
        self.context_length, self.stride = context_length, stride
        self._count = (len(self.ids) - context_length - 1) // stride + 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self._count <= k < self._count:
            raise IndexError(f"window {k} out of range for {self._count} windows")
        start = (k % self._count) * self.stride
        window = self.ids[start:start + self.context_length + 1]
        return window[:-1], window[1:]


def create_dataloader(ids_or_text, batch_size: int = 4, context_length: int = 256, stride: int | None = None,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0, seed: int = 0,
                      tokenizer=None) -> DataLoader:
    """Batches of (inputs, targets), each (batch_size, context_length) int64.

    Text is tokenized with `tokenizer` (GPT-2's by default). Shuffling draws from
    its own generator seeded with `seed`, so the order is the same every run.
    """
    if batch_size < 1:
        raise FastGPTError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(ids_or_text, str):
        if tokenizer is None:
            from ..tokenizer import Tokenizer
            tokenizer = Tokenizer()
        ids_or_text = tokenizer.encode(ids_or_text)
    dataset = NextTokenWindows(ids_or_text, context_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise FastGPTError(f"{len(dataset)} windows of context_length {context_length} (stride {dataset.stride}) "
                           f"are fewer than batch_size {batch_size}; with drop_last no batch would remain")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
