"""Training data: sliding-window datasets over token ids, and token shards on disk.

- `windows`: `NextTokenWindows` / `create_dataloader` for a token list or a text in memory.
- `shards`: `TokenShards`, the memory-mapped reader of a prepared corpus (random or resumable sequential batches).
- `prepare`: text files -> shards + meta.json (`fastgpt prepare`).
"""
from .prepare import Source, collect_inputs, prepare
from .shards import SequentialBatches, ShardPosition, TokenShards, read_meta
from .windows import NextTokenWindows, create_dataloader

__all__ = ["NextTokenWindows", "create_dataloader", "TokenShards", "SequentialBatches", "ShardPosition",
           "read_meta", "Source", "collect_inputs", "prepare"]
