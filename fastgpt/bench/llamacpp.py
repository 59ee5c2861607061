"""llama.cpp as a contender in the generation benchmark, through `llama-cpp-python` (optional).

Why its own module: the benchmark must put llama.cpp next to fastgpt on the same weights, the
same prompt ids, the same number of new tokens and the same threads. The weights are fastgpt's,
written to GGUF by `fastgpt.weights.gguf_export`; the prompt goes in as token ids (no text
tokenization); every token is picked by llama.cpp's own greedy sampler alone (argmax: no
temperature, no repetition penalty, no EOS stop), so its tokens can be compared with fastgpt's.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import FastGPTError


def available() -> bool:
    """Whether llama-cpp-python and gguf are importable (found without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gguf"))


def version() -> str:
    """llama-cpp-python's version (it vendors llama.cpp at a fixed commit per release)."""
    import llama_cpp
    return llama_cpp.__version__


@dataclass
class LlamaCppResult:
    tokens: list[int]
    first_token_s: float  # prefill and the first sampled token
    total_s: float


class LlamaCppGreedy:
    """A GGUF file loaded in llama.cpp, decoding greedily from given token ids."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int, n_batch: int = 512):
        try:
            import llama_cpp
        except ImportError:
            raise FastGPTError("llama.cpp contender: pip install llama-cpp-python") from None
        if threads < 1:
            raise FastGPTError(f"llama.cpp contender: threads must be >= 1, got {threads}")
        self._lib, self.n_ctx = llama_cpp, n_ctx  # llama.cpp rounds its own n_ctx up to 256
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_batch, n_ubatch=n_batch, verbose=False, logits_all=False)
        self._greedy = llama_cpp.llama_sampler_init_greedy()

    def generate(self, prompt: Sequence[int], new_tokens: int) -> LlamaCppResult:
        """`new_tokens` greedy tokens after `prompt`, from an empty KV cache."""
        if len(prompt) + new_tokens > self.n_ctx:
            raise FastGPTError(f"llama.cpp contender: prompt + new tokens ({len(prompt) + new_tokens}) exceed "
                               f"n_ctx {self.n_ctx}")
        llm, ctx, sample = self.llm, self.llm._ctx.ctx, self._lib.llama_sampler_sample
        llm.reset()  # the next eval drops the cached positions past 0
        start = time.perf_counter()
        llm.eval(list(prompt))
        token = sample(self._greedy, ctx, -1)
        first = time.perf_counter() - start
        tokens = [token]
        while len(tokens) < new_tokens:
            llm.eval([token])
            token = sample(self._greedy, ctx, -1)
            tokens.append(token)
        return LlamaCppResult(tokens, first, time.perf_counter() - start)

    def close(self) -> None:
        if self._greedy is not None:
            self._lib.llama_sampler_free(self._greedy)
            self._greedy = None
        self.llm.close()
