"""A preallocated key/value cache for fast decoding.

Generating token t+1 needs the keys and values of tokens 0..t of every layer.
Recomputing them each step costs O(t) work per token; caching them costs memory
instead. The cache is allocated once at its maximum length (static shapes, so a
decode step can be captured in a CUDA graph) and every sequence of the batch
keeps its own length, so prompts of different lengths share one batch.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch_size, n_head, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # number of valid positions of each sequence (== position of its next token)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int | None = None) -> "KVCache":
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.n_head, max_length or cfg.context_length, cfg.head_dim,
                   dtype=param.dtype, device=param.device)

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.lengths.zero_()

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt's keys/values (B, H, T, D) at positions 0..T-1 of every sequence."""
        T = k.shape[2]
        self.k[layer, :, :, :T] = k
        self.v[layer, :, :, :T] = v

    def write_step(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new key/value (B, H, 1, D) per sequence at that sequence's own position."""
        rows = torch.arange(self.batch_size, device=k.device)
        self.k[layer, rows, :, self.lengths] = k[:, :, 0]
        self.v[layer, rows, :, self.lengths] = v[:, :, 0]

    def write_at(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store T new keys/values (B, T, H, D) per sequence at positions (B, T): the ones a
        step over several new tokens (speculative verification) writes. Earlier contents of
        those slots (a rejected speculation's) are simply overwritten."""
        rows = torch.arange(self.batch_size, device=k.device)[:, None]
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v
