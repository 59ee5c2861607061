"""fastgpt: a GPT-2-family LLM engine whose hot path runs on hand-written Triton kernels."""
from .config import GPTConfig, PRESETS, preset
from .errors import FastGPTError
from .model import GPT
from .kv_cache import KVCache

__all__ = ["GPT", "GPTConfig", "PRESETS", "preset", "FastGPTError", "KVCache"]
__version__ = "0.1.0"
