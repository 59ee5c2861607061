"""Continuous batching: many requests decode together, and a new one joins at the next step.

A server that runs one request at a time (behind a global lock) leaves the machine
idle: decoding one sequence reads every weight once per token, and reading them once
for 16 sequences costs little more. So one background thread owns the model and a
static KV cache whose batch rows are *slots*:

    loop:  drop cancelled requests (their slots free up)
           admit waiting requests into free slots: prefill their prompts (together, one
               forward pass) into their own slots (the others' cached keys/values are
               untouched), sample each first token
           one decode step for every occupied slot, each at its own position
           sample each row with that request's own parameters and generator

A request never waits for the running batch to finish: it waits at most one decode
step plus one prefill. The prompts admitted together are prefilled as
`fastgpt.generate.generate` prefills a ragged batch, and each decode step goes through
the same `hidden_states_at` / `head_logits`. On CPUs where fastgpt's C kernel runs the
decode step (`fastgpt.native_decode`), each row is computed on its own, bit for bit as it
would be alone. One caveat, measured, for PyTorch's CPU matrix kernels (the fallback): they
round a row differently depending on how many rows there are (here a row of a 1- to 7-row
product differed from the same row in an 8+ row one), so a batched row's logits can differ
from the batch-1 ones in the last bits; greedy tokens then differ only where the two best
logits tie to ~1e-6.
Padding the batch to a fixed row count would make rows independent of each other but
cost ~3x per step for a lone request (GPT-2 MLP, 1 vs 8 rows), and still not equal the
batch-1 path, so the decode step runs exactly the occupied rows. Text goes through
`TextStream`, so a stop string is never emitted, even when it spans tokens.

The engine speaks plain Python: `submit()` takes token ids and returns a `Sequence`
whose `sink` receives `Event`s from the engine thread. The HTTP layer lives elsewhere.
"""
from __future__ import annotations

import copy
import itertools
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable
from typing import Sequence as Seq

import torch

from ..cached_forward import head_logits, hidden_states_at
from ..errors import FastGPTError
from ..generate import TextStream
from ..kv_cache import KVCache
from ..sampling import SamplingParams, sample

# Prompts prefilled together in one forward pass: at most this many (padded) tokens, so a
# burst of long prompts does not stall the running decode steps for long.
PREFILL_TOKEN_BUDGET = 2048
# The decode step attends over cache positions [0, window); the window grows in these steps.
WINDOW_STEP = 64


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full: answer 503, do not wait."""


@dataclass
class Event:
    """What the engine reports for one sequence: new text, and at the end why it stopped."""
    text: str = ""
    finish_reason: str | None = None   # "stop" (EOS or a stop string) or "length"; None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None           # set when the engine failed on this sequence


@dataclass
class Sequence:
    """One prompt being continued. `cancel()` is safe from any thread."""
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str]
    sink: Callable[[Event], None]
    generator: torch.Generator | None = None
    id: int = 0
    slot: int | None = None
    completion_tokens: int = 0
    last_token: int = 0                 # the token the next decode step feeds
    finish_reason: str | None = None
    cancelled: bool = False
    text: TextStream | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Owns the model; `start()` runs the batching loop in a daemon thread."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, eos_id: int | None = None):
        if max_batch < 1:
            raise FastGPTError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise FastGPTError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos_id = tokenizer.eot_id if eos_id is None else eos_id
        self.context_length = model.config.context_length
        self.device = model.device
        self.cache = KVCache.for_model(model, max_batch, max_length=self.context_length)
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Condition()
        self.ids = itertools.count(1)
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0            # decode steps run (for tests and stats)
        self.peak_batch = 0       # most sequences decoding together so far
        self.peak_prefill = 0     # most prompts prefilled together so far
        self.cancelled = 0        # sequences dropped because their client went away

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: Seq[int], max_tokens: int, params: SamplingParams, *, seed: int | None = None,
               stop: Seq[str] = (), sink: Callable[[Event], None]) -> Sequence:
        """Queue one sequence. Raises FastGPTError for bad input, QueueFull when there is no room."""
        return self.submit_many([(list(prompt_ids), seed)], max_tokens, params, stop=stop, sinks=[sink])[0]

    def submit_many(self, prompts: Seq[tuple[list[int], int | None]], max_tokens: int, params: SamplingParams, *,
                    stop: Seq[str] = (), sinks: Seq[Callable[[Event], None]]) -> list[Sequence]:
        """Queue several (prompt ids, seed) sequences all or none: a request with n choices
        must not half-start."""
        for prompt_ids, _ in prompts:
            self.check_fits(len(prompt_ids), max_tokens)
        seqs = []
        for (prompt_ids, seed), sink in zip(prompts, sinks, strict=True):
            generator = None
            if seed is not None and not params.greedy:
                generator = torch.Generator(device=self.device).manual_seed(seed)
            seqs.append(Sequence(list(prompt_ids), max_tokens, params, [s for s in stop if s], sink, generator))
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            free = sum(s is None for s in self.slots)
            if len(self.waiting) + len(seqs) > self.max_queue + free:
                raise QueueFull(f"all {self.max_batch} slots are busy and {len(self.waiting)} requests wait "
                                f"(--max-queue {self.max_queue})")
            for seq in seqs:
                seq.id = next(self.ids)
                self.waiting.append(seq)
            self.lock.notify()
        return seqs

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """The prompt and the tokens asked for must fit in the context window together."""
        if prompt_tokens < 1:
            raise FastGPTError("the prompt is empty")
        if max_tokens < 1:
            raise FastGPTError(f"max_tokens must be >= 1, got {max_tokens}")
        if prompt_tokens + max_tokens > self.context_length:
            raise FastGPTError(f"this model's maximum context length is {self.context_length} tokens, but the "
                               f"prompt has {prompt_tokens} tokens and max_tokens asks for {max_tokens} more")

    def load(self) -> tuple[int, int]:
        """(sequences decoding, sequences waiting)."""
        with self.lock:
            return sum(s is not None for s in self.slots), len(self.waiting)

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="fastgpt-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the loop; sequences still queued or running end with an error event."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout)
        for seq in list(self.waiting) + [s for s in self.slots if s is not None]:
            self._fail(seq, "the server shut down")

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    while not self.stopping and not self.waiting and all(s is None for s in self.slots):
                        self.lock.wait()
                    if self.stopping:
                        return
                try:
                    self._step()
                except Exception as err:  # a failing step must not take the server down
                    traceback.print_exc()
                    message = f"generation failed: {type(err).__name__}: {err}"
                    for seq in [s for s in self.slots if s is not None]:
                        self._fail(seq, message)

    def _step(self) -> None:
        for slot, seq in enumerate(self.slots):
            if seq is not None and seq.cancelled:
                seq.finish_reason = "cancelled"
                self.cancelled += 1
                self._free(slot)
        admitted = []
        with self.lock:
            while self.waiting and None in self.slots:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    seq.finish_reason = "cancelled"
                    self.cancelled += 1
                    continue
                seq.slot = self.slots.index(None)
                self.slots[seq.slot] = seq
                admitted.append(seq)
        group: list[Sequence] = []
        for seq in admitted:  # prefill together, as generate() prefills a batch, within the token budget
            longest = max([len(seq.prompt_ids)] + [len(s.prompt_ids) for s in group])
            if group and (len(group) + 1) * longest > PREFILL_TOKEN_BUDGET:
                self._prefill(group)
                group = []
            group.append(seq)
        if group:
            self._prefill(group)
        if any(s is not None for s in self.slots):
            self._decode()

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Run the prompts through the model (right-padded, one forward pass, as
        `generate` prefills a batch), copy each one's keys/values into its slot, and
        sample each first token. One pass reads the weights once for all the prompts:
        16 clients arriving together wait for one prefill, not for 16 in turn."""
        lengths = [len(seq.prompt_ids) for seq in seqs]
        self.peak_prefill = max(self.peak_prefill, len(seqs))
        idx = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
        for j, seq in enumerate(seqs):
            idx[j, :lengths[j]] = torch.tensor(seq.prompt_ids)
        scratch = KVCache.for_model(self.model, len(seqs), max_length=max(lengths))
        hidden = self.model.hidden_states(idx.to(self.device), scratch)
        rows = torch.arange(len(seqs), device=self.device)
        logits = head_logits(self.model, hidden[rows, torch.tensor(lengths, device=self.device) - 1])
        for j, seq in enumerate(seqs):
            T = lengths[j]
            self.cache.k[:, seq.slot, :, :T] = scratch.k[:, j, :, :T]
            self.cache.v[:, seq.slot, :, :T] = scratch.v[:, j, :, :T]
            self.cache.lengths[seq.slot] = T
        for j, seq in enumerate(seqs):
            seq.text = TextStream(self.tokenizer, seq.stop)
            self._accept(seq, int(sample(logits[j:j + 1], seq.params, seq.generator)[0]))

    def _decode(self) -> None:
        """One token for every occupied slot, each at its own position."""
        occupied = [i for i, s in enumerate(self.slots) if s is not None]
        rows = occupied[-1] + 1  # free slots below the last occupied one ride along (new ones take the lowest)
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        advance = torch.zeros(rows, dtype=torch.long)
        for i in occupied:
            seq = self.slots[i]
            tokens[i, 0] = seq.last_token
            advance[i] = 1
        longest = int(self.cache.lengths[:rows].max()) + 1
        window = min(self.cache.max_length, -(-longest // WINDOW_STEP) * WINDOW_STEP)
        view = _cache_rows(self.cache, 0, rows, window)
        logits = head_logits(self.model, hidden_states_at(self.model, tokens.to(self.device), view)[:, 0])
        view.lengths += advance.to(self.device)
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(occupied))
        greedy = [i for i in occupied if self.slots[i].params.greedy]
        picked = {}
        if greedy:
            best = torch.argmax(logits[greedy].float(), dim=-1).tolist()
            picked.update(zip(greedy, best, strict=True))
        for i in occupied:
            if i not in picked:
                seq = self.slots[i]
                picked[i] = int(sample(logits[i:i + 1], seq.params, seq.generator)[0])
        for i in occupied:
            self._accept(self.slots[i], picked[i])

    # ------------------------------------------------------------------ bookkeeping
    def _accept(self, seq: Sequence, token: int) -> None:
        """Record a sampled token: emit the text that is safe to show, finish when it is time."""
        seq.completion_tokens += 1
        seq.last_token = token
        if token == self.eos_id:
            self._finish(seq, "stop", seq.text.finish())
            return
        text = seq.text.push(token)
        if seq.text.stopped:
            self._finish(seq, "stop", text)
        elif seq.completion_tokens >= seq.max_tokens:
            self._finish(seq, "length", text + seq.text.finish())
        elif text:
            seq.sink(Event(text=text))

    def _finish(self, seq: Sequence, reason: str, text: str) -> None:
        seq.finish_reason = reason
        if seq.slot is not None:
            self._free(seq.slot)
        seq.sink(Event(text=text, finish_reason=reason, prompt_tokens=len(seq.prompt_ids),
                       completion_tokens=seq.completion_tokens))

    def _fail(self, seq: Sequence, message: str) -> None:
        if seq.slot is not None:
            self._free(seq.slot)
        if seq.finish_reason is None:
            seq.finish_reason = "error"
            seq.sink(Event(error=message, prompt_tokens=len(seq.prompt_ids),
                           completion_tokens=seq.completion_tokens))

    def _free(self, slot: int) -> None:
        with self.lock:
            seq = self.slots[slot]
            self.slots[slot] = None
        if seq is not None:
            seq.slot = None
        # A free row still rides along in decode steps: keep it at position 0.
        self.cache.lengths[slot] = 0


def _cache_rows(cache: KVCache, start: int, stop: int, length: int) -> KVCache:
    """The cache's batch rows [start, stop) and positions [0, length), as views: what the
    model writes through it lands in the full cache."""
    view = copy.copy(cache)
    view.k = cache.k[:, start:stop, :, :length]
    view.v = cache.v[:, start:stop, :, :length]
    view.lengths = cache.lengths[start:stop]
    return view
