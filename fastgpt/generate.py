"""Autoregressive generation with a preallocated KV cache.

    prompts (ragged) --prefill once--> logits of each prompt's last real token
        --> sample --> one-token decode step per sequence, each at its own position
        --> sample --> ... until EOS, a stop string, or max_new_tokens

Prompts of different lengths share one batch: they are right-padded and run
through the model once (the prefill). Sequence b's first new token comes from the
hidden state at position len_b - 1; the keys/values the padding wrote at positions
len_b.. are garbage, but every decode step writes its token at `cache.lengths[b]`
(overwriting them) and attends only to positions below it, so they are never read.

Context window: a prompt longer than the model's context is cropped from the left
(with a warning). When a sequence fills the context while generating, the cache
"slides": the last context_length // 2 tokens of every sequence are prefilled into
the (reset) cache and generation continues from there. That costs one prefill per
context_length // 2 new tokens instead of a full forward pass per token. The
uncached path (use_cache=False) feeds the model exactly the same windows, so both
paths produce the same tokens.

Decode steps run through `fastgpt.cached_forward` (any offset, no host sync: the same
step is compiled, recorded as a CUDA graph, or run eagerly); speculative decoding
(`draft=` / `prompt_lookup=`, batch 1) drafts tokens with `fastgpt.speculative` and
verifies them in one pass over the cache.
"""
from __future__ import annotations

import codecs
import numbers
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .cached_forward import head_logits, hidden_states_at
from .errors import FastGPTError
from .gpt2_vocab import EOT_ID
from .kv_cache import KVCache
from .sampling import SamplingParams, sample, sample_with_noise
from .speculative import (
    DraftModel,
    SpeculationStats,
    accept_greedy,
    accept_sampling,
    check_draft,
    probabilities,
    prompt_lookup_proposal,
)


@dataclass
class GenerationStats:
    """Wall times of one `generate` call (seconds), synchronised with the device."""
    prompt_tokens: int = 0       # tokens prefilled (all sequences)
    new_tokens: int = 0          # tokens sampled (all sequences, EOS included)
    prefill_s: float = 0.0       # first forward pass over the prompts
    first_token_s: float = 0.0   # time to first token: prefill + first sample
    decode_s: float = 0.0        # everything after the first token
    decode_tokens: int = 0       # tokens sampled after the first one of each sequence

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens, prefill {self.prefill_s * 1e3:.1f} ms "
                f"({self.prefill_tokens_per_s:,.0f} tokens/s) | time to first token "
                f"{self.first_token_s * 1e3:.1f} ms | decode {self.decode_tokens} tokens in "
                f"{self.decode_s:.2f} s ({self.decode_tokens_per_s:,.1f} tokens/s)")


@dataclass
class Generation:
    """New tokens of each sequence (EOS left out), and why each stopped:
    "eos", "stop" (a stop string appeared; its tokens are kept) or "length"."""
    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)
    speculation: SpeculationStats | None = None  # set by speculative decoding


def generate(model, prompt_ids: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = EOT_ID, stop_strings: Sequence[str] | None = None,
             tokenizer=None, use_cache: bool = True, on_token: Callable[[int, int], None] | None = None,
             cuda_graph: bool | None = None, compile: bool = False, draft=None, speculate_k: int = 4,
             prompt_lookup: bool = False) -> Generation:
    """Continue each prompt by up to `max_new_tokens` tokens.

    prompt_ids: a list of token-id lists (lengths may differ), or a (T,) / (B, T) tensor.
    temperature 0 is greedy; top_k / top_p filter the distribution before sampling;
    `seed` makes sampling reproducible (a private torch.Generator; the global RNG
    is untouched). A sequence stops at `eos_id` or when its text contains one of
    `stop_strings` (which needs `tokenizer`); the others go on.
    `on_token(b, token_id)` is called as soon as sequence b produces a token (streaming).
    `cuda_graph`: replay the decode step, sampling included, as a CUDA graph (default: on CUDA).
    `compile`: run the decode step through `torch.compile` (one compilation per cache shape).
    Speculative decoding (batch 1): `draft` (a smaller model with the same vocabulary) or
    `prompt_lookup=True` (n-grams of the text itself) proposes `speculate_k` tokens that
    the model verifies in one pass; greedy output is token-identical to plain greedy, and
    sampling keeps the model's distribution. `Generation.speculation` holds the counts.
    """
    params = SamplingParams(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise FastGPTError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if stop_strings and tokenizer is None:
        raise FastGPTError("stop_strings needs a tokenizer to turn tokens into text")
    prompts = _prompt_lists(prompt_ids, model.config.vocab_size, model.config.context_length)
    speculative = draft is not None or prompt_lookup
    if speculative:
        _check_speculation(model, draft, prompt_lookup, speculate_k, len(prompts), use_cache)
    models = [model] + ([draft] if draft is not None else [])
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            run = _Run(model, prompts, max_new_tokens, params, seed, eos_id, stop_strings, tokenizer,
                       use_cache, on_token, cuda_graph and not speculative, compile)
            if speculative:
                return run.run_speculative(draft, speculate_k)
            return run.run()
    finally:
        for m, training in zip(models, was_training, strict=True):
            m.train(training)


def _check_speculation(model, draft, prompt_lookup: bool, k: int, batch_size: int, use_cache: bool) -> None:
    if draft is not None and prompt_lookup:
        raise FastGPTError("choose one proposer: a draft model or prompt lookup, not both")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FastGPTError(f"speculate_k must be an integer >= 1, got {k!r}")
    if batch_size != 1:
        raise FastGPTError(f"speculative decoding runs one sequence at a time, got a batch of {batch_size} prompts")
    if not use_cache:
        raise FastGPTError("speculative decoding needs the KV cache (use_cache=True)")
    if draft is not None:
        check_draft(model, draft)
        if draft.device != model.device:
            raise FastGPTError(f"--draft is on {draft.device}, the model on {model.device}: put both on one device")


def _prompt_lists(prompt_ids, vocab_size: int, context_length: int) -> list[list[int]]:
    """Validate the prompts and crop those longer than the context from the left."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() not in (1, 2) or prompt_ids.dtype.is_floating_point:
            raise FastGPTError(f"prompt_ids must be an integer tensor (T,) or (B, T), got {tuple(prompt_ids.shape)} "
                               f"{prompt_ids.dtype}")
        prompt_ids = prompt_ids.reshape(-1, prompt_ids.shape[-1]).tolist()
    prompts = [list(p) for p in prompt_ids]
    if not prompts:
        raise FastGPTError("prompt_ids: no prompts given")
    for b, prompt in enumerate(prompts):
        if not prompt:
            raise FastGPTError(f"prompt_ids[{b}] is empty (start from the end-of-text token {EOT_ID} instead)")
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, numbers.Integral)
                    or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise FastGPTError(f"prompt_ids[{b}] holds {bad!r}, not a token id in [0, {vocab_size})")
        prompt = [int(t) for t in prompt]
        if len(prompt) > context_length:
            warnings.warn(f"prompt {b} has {len(prompt)} tokens; keeping its last {context_length} "
                          f"(the model's context length)", stacklevel=3)
            prompt = prompt[-context_length:]
        prompts[b] = prompt
    return prompts


class _StopStrings:
    """Finds a stop string in a sequence's output as bytes, so a string that spans
    tokens, or ends inside a multi-byte character, is still found."""

    def __init__(self, stop_strings: Sequence[str], tokenizer, batch_size: int):
        self.patterns = [s.encode("utf-8") for s in stop_strings if s]
        self.tokenizer = tokenizer
        self.keep = max((len(p) for p in self.patterns), default=1) - 1
        self.tails = [b""] * batch_size  # the last bytes that could begin a stop string

    def hit(self, b: int, token: int) -> bool:
        window = self.tails[b] + self.tokenizer.decode_bytes([token])
        self.tails[b] = window[len(window) - self.keep:] if self.keep else b""
        return any(p in window for p in self.patterns)


class _Run:
    """The state of one generate() call: token histories, the cache, the stop rules."""

    def __init__(self, model, prompts, max_new_tokens, params, seed, eos_id, stop_strings, tokenizer,
                 use_cache, on_token, cuda_graph, compile=False):
        self.model, self.params, self.eos_id, self.on_token = model, params, eos_id, on_token
        self.max_new_tokens = max_new_tokens
        self.device = model.device
        self.context = model.config.context_length
        B = len(prompts)
        self.history = prompts                      # prompt + new tokens, per sequence
        self.start = [0] * B                        # where the model's window begins in history[b]
        self.out = [[] for _ in range(B)]
        self.finish = ["length"] * B
        self.active = [True] * B
        self.stops = _StopStrings(stop_strings, tokenizer, B) if stop_strings else None
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cache = None
        if use_cache:
            # Sized to what this call can use: a smaller cache is less for decode attention to read.
            need = min(self.context, max(map(len, prompts)) + max_new_tokens)
            self.cache = KVCache.for_model(model, B, max_length=max(need, 1))
            self.advance = torch.ones(B, dtype=torch.long, device=self.device)  # 1 = active, 0 = frozen
            self.step_tokens = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.graph_by_default = cuda_graph is None
        if cuda_graph is None:
            cuda_graph = use_cache and self.device.type == "cuda"
        if cuda_graph and not (use_cache and self.device.type == "cuda"):
            raise FastGPTError("cuda_graph needs use_cache=True and a model on a CUDA device")
        self.cuda_graph = cuda_graph
        self.graph_step = None
        self.step_fn = _compiled_step(model) if compile else _decode_step
        self.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))

    # -------------------------------------------------------------- forward passes
    def windows(self) -> list[list[int]]:
        """What the model sees of each sequence. An active window always fits (see slide).
        A finished sequence's output is ignored, so its window is cropped to leave it a
        valid slot for the dummy token it feeds each decode step."""
        room = self.cache.max_length if self.cache is not None else self.context
        return [h[s:] if active else h[max(s, len(h) - max(room - 1, 1)):]
                for h, s, active in zip(self.history, self.start, self.active, strict=True)]

    def prefill(self) -> torch.Tensor:
        """Logits (B, V) after the last real token of each right-padded window.

        Only those B hidden states go through the LM head: the (B, T, V) logits of
        every prompt position would cost T times the largest matmul for nothing.
        """
        windows = self.windows()
        lengths = torch.tensor([len(w) for w in windows], device=self.device)
        idx = torch.zeros(len(windows), int(lengths.max()), dtype=torch.long)
        for b, w in enumerate(windows):
            idx[b, :len(w)] = torch.tensor(w)
        if self.cache is not None:
            self.cache.reset()
        hidden = self.model.hidden_states(idx.to(self.device), self.cache)
        last = hidden[torch.arange(len(windows), device=self.device), lengths - 1]
        if self.cache is not None:
            self.cache.lengths.copy_(lengths)
        return head_logits(self.model, last)

    def decode(self, tokens: list[int]) -> list[int]:
        """One new token per sequence, each at its own cache position -> the next token of each."""
        self.step_tokens.copy_(torch.tensor(tokens)[:, None])
        if self.cuda_graph and self.graph_step is None:
            try:
                self.graph_step = _CUDAGraphStep(self.model, self.step_tokens, self.cache, self.advance, self.params)
            except RuntimeError as err:
                if not self.graph_by_default:
                    raise
                # Some op of the step cannot be recorded (a host sync, say): stay eager.
                warnings.warn(f"CUDA graph capture of the decode step failed, decoding without it: {err}", stacklevel=3)
                self.cuda_graph = False
        if self.cuda_graph:
            return self.graph_step(self.generator).tolist()
        logits = self.step_fn(self.model, self.step_tokens, self.cache)
        self.cache.lengths += self.advance  # frozen (finished) sequences stay where they are
        return sample(logits, self.params, self.generator).tolist()

    # -------------------------------------------------------------- bookkeeping
    def accept(self, b: int, token: int) -> None:
        """Record sequence b's new token and decide whether b is finished."""
        self.stats.new_tokens += 1
        if self.eos_id is not None and token == self.eos_id:
            self.freeze(b, "eos")
            return
        self.history[b].append(token)
        self.out[b].append(token)
        if self.on_token is not None:
            self.on_token(b, token)
        if self.stops is not None and self.stops.hit(b, token):
            self.freeze(b, "stop")

    def freeze(self, b: int, reason: str) -> None:
        self.active[b], self.finish[b] = False, reason
        if self.cache is not None:
            # A finished row still rides along in the static-shape decode step: it
            # rewrites one slot at a valid position and its output is ignored.
            self.advance[b] = 0
            self.cache.lengths[b] = min(int(self.cache.lengths[b]), self.cache.max_length - 1)

    def needs_slide(self) -> bool:
        """Would some active sequence's next token fall outside the context window?"""
        return any(a and len(h) - s > self.context
                   for a, h, s in zip(self.active, self.history, self.start, strict=True))

    def slide(self) -> None:
        keep = max(self.context // 2, 1)
        for b, h in enumerate(self.history):
            if self.active[b] and len(h) - self.start[b] > self.context:
                self.start[b] = len(h) - keep

    # -------------------------------------------------------------- the loops
    def _timed(self, loop) -> Generation:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        loop(t0, sync)
        sync()
        if self.max_new_tokens:
            self.stats.decode_s = time.perf_counter() - t0 - self.stats.first_token_s
            first_tokens = len(self.history)
            self.stats.decode_tokens = max(self.stats.new_tokens - first_tokens, 0)
        return Generation(self.out, self.finish, self.stats)

    def _first_tokens(self, t0: float, sync) -> list[int] | None:
        """Prefill and sample each sequence's first token (timed as the time to first token)."""
        if not self.max_new_tokens:
            return None
        logits = self.prefill()
        sync()
        self.stats.prefill_s = time.perf_counter() - t0
        tokens = sample(logits, self.params, self.generator).tolist()
        for b, token in enumerate(tokens):
            self.accept(b, token)
        self.stats.first_token_s = time.perf_counter() - t0
        return tokens

    def run(self) -> Generation:
        def loop(t0, sync):
            if self._first_tokens(t0, sync) is None:
                return
            for _ in range(self.max_new_tokens - 1):
                if not any(self.active):
                    break
                if self.needs_slide():
                    self.slide()
                    tokens = sample(self.prefill(), self.params, self.generator).tolist()
                elif self.cache is None:
                    tokens = sample(self.prefill(), self.params, self.generator).tolist()
                else:
                    tokens = self.decode([h[-1] for h in self.history])
                for b, token in enumerate(tokens):
                    if self.active[b]:
                        self.accept(b, token)
        return self._timed(loop)

    def run_speculative(self, draft, k: int) -> Generation:
        """Batch-1 decoding where a proposer (`draft` model, or prompt lookup when None)
        drafts up to k tokens and one target pass over K + 1 positions verifies them."""
        # The window must fit both models' caches: the target's verification writes up to
        # position len(window) - 1 + K, the draft's proposal up to len(window) - 2 + K.
        limit = self.cache.max_length if draft is None else min(self.cache.max_length, draft.config.context_length)
        proposer = DraftModel(draft, limit) if draft is not None else None
        speculation = SpeculationStats()
        self.cache = KVCache.for_model(self.model, 1, max_length=limit)

        def loop(t0, sync):
            if self._first_tokens(t0, sync) is None:
                return
            history = self.history[0]
            while self.active[0] and len(self.out[0]) < self.max_new_tokens:
                window = history[self.start[0]:]
                if len(window) > limit:  # as `slide`: go on from the window's last half, both caches anew
                    self.start[0] = len(history) - max(limit // 2, 1)
                    window = history[self.start[0]:]
                    self.cache.lengths.fill_(0)
                    hidden_states_at(self.model, torch.tensor([window[:-1]], device=self.device), self.cache)
                    if proposer is not None:
                        proposer.reset()
                room = limit - len(window)
                want = min(k, room, self.max_new_tokens - len(self.out[0]) - 1)
                drafts, draft_probs = [], None
                if want > 0 and proposer is not None:
                    drafts, draft_probs = proposer.propose(window, want, self.params, self.generator)
                elif want > 0:
                    drafts = prompt_lookup_proposal(window, want)
                self.cache.lengths.fill_(len(window) - 1)
                idx = torch.tensor([window[-1:] + drafts], device=self.device)
                logits = head_logits(self.model, hidden_states_at(self.model, idx, self.cache)[0])
                if self.params.greedy:
                    n, token = accept_greedy(drafts, logits)
                else:
                    n, token = accept_sampling(drafts, draft_probs, probabilities(logits, self.params),
                                               self.generator)
                if proposer is not None and drafts:
                    proposer.keep(len(window), n)
                speculation.proposed += len(drafts)
                speculation.accepted += n
                speculation.steps += 1
                for t in drafts[:n] + [token]:
                    if self.active[0] and len(self.out[0]) < self.max_new_tokens:
                        self.accept(0, t)

        result = self._timed(loop)
        result.speculation = speculation
        return result


def _decode_step(model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of one new token per sequence at its own position (no host sync)."""
    return head_logits(model, hidden_states_at(model, tokens, cache)[:, 0])


def sampling_decode_step(model, tokens: torch.Tensor, cache: KVCache, advance: torch.Tensor, params: SamplingParams,
                         noise: torch.Tensor) -> torch.Tensor:
    """The whole step a CUDA graph records: logits of `tokens` (B, 1), each sequence's cache
    length advanced by `advance` (1 active, 0 finished), the next tokens (B,) sampled with
    `noise`. Pure tensor work on static buffers: no host sync, no allocation that
    depends on values, so it is as correct replayed as run eagerly (tested on CPU)."""
    logits = _decode_step(model, tokens, cache)
    cache.lengths.add_(advance)
    return sample_with_noise(logits, params, noise)


# model -> its compiled decode step (compiled once, reused by later calls)
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_step(model):
    """`_decode_step` through torch.compile. Static shapes: a new cache size recompiles."""
    step = _COMPILED_STEPS.get(model)
    if step is None:
        step = _COMPILED_STEPS[model] = torch.compile(_decode_step, dynamic=False)
    return step


class _CUDAGraphStep:
    """One whole decode step, sampling included, recorded as a CUDA graph and replayed.

    At batch 1 a decode step is ~100 small kernels; launching them one by one from
    Python costs more than running them (the H100 decoded GPT-2 at 976 tokens/s against
    a bandwidth bound of ~10,600). A graph replays them all with a single launch.
    Everything the step reads lives in static tensors updated in place: the token ids,
    the cache, its lengths, which the step itself advances, and the sampling noise,
    refilled before each replay. So the graph stays valid for the whole run, and the
    host reads back only the B sampled token ids.
    """

    def __init__(self, model, tokens: torch.Tensor, cache: KVCache, advance: torch.Tensor, params: SamplingParams):
        self.params = params
        self.noise = torch.ones(tokens.shape[0], model.config.vocab_size, device=tokens.device)
        lengths = cache.lengths.clone()

        def step():
            return sampling_decode_step(model, tokens, cache, advance, params, self.noise)

        # Warm up on a side stream (Triton compiles, allocator pools), then capture. The
        # warm-up steps write the slots the real step will write; the lengths are restored.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
                cache.lengths.copy_(lengths)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.next_tokens = step()
        cache.lengths.copy_(lengths)  # capture records the kernels without running them

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.params.greedy:
            self.noise.exponential_(generator=generator)
        self.graph.replay()
        return self.next_tokens


class TextStream:
    """Token ids -> text, for printing while generating.

    A GPT-2 token is a run of bytes that may end in the middle of a UTF-8 character,
    so bytes go through an incremental decoder that holds back an incomplete tail.
    With stop strings, the last (longest stop - 1) characters are held back too,
    and `finish()` cuts the text at the first stop string, which is never printed.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] | None = None):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""   # decoded, not yet returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Text that is now safe to show."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        cut = self._stop_index()
        if cut is not None:
            self.stopped = True
            text, self.pending = self.pending[:cut], ""
            return text
        ready = len(self.pending) - self.hold
        if ready <= 0:
            return ""
        text, self.pending = self.pending[:ready], self.pending[ready:]
        return text

    def finish(self) -> str:
        """Whatever was held back (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        cut = self._stop_index()
        text = self.pending[:cut] if cut is not None else self.pending
        self.pending, self.stopped = "", True
        return text

    def _stop_index(self) -> int | None:
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None
