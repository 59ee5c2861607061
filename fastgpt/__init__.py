"""fastgpt: a GPT-2-family LLM engine whose hot path runs on hand-written Triton kernels.

The names below are imported lazily, so `fastgpt --help` does not pay for torch.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "PRESETS", "preset", "FastGPTError", "KVCache", "Tokenizer",
           "load_pretrained", "save_pretrained"]

_WHERE = {"GPT": "model", "GPTConfig": "config", "PRESETS": "config", "preset": "config",
          "FastGPTError": "errors", "KVCache": "kv_cache", "Tokenizer": "tokenizer",
          "load_pretrained": "weights", "save_pretrained": "weights"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'fastgpt' has no attribute {name!r}")
