"""One optimizer step, shared by every training loop: pretraining, classification, instruction
tuning, and whatever comes next (DPO): the loop hands in a `loss_fn(batch) -> loss`, so the step
never assumes `model(x, y)`.

    set the learning rate (or leave it to the caller: a CUDA graph refills its tensor before a replay)
    for each micro-batch: loss = loss_fn(batch) / n under autocast, (scaled) backward;
                          `sync(last)` lets DDP/FSDP all-reduce on the last micro-batch only
    unscale, clip the global gradient norm, step (skipped by the fp16 scaler on inf), zero the grads

The mean loss and the gradient norm come back as device tensors. Reading one (`.item()`,
`float()`) waits for the device, so loops keep steps in `PendingSteps` and read them together,
when they log, evaluate or save; the finite-loss check happens then, before anything is saved.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import FastGPTError
from .optim import set_learning_rate


@dataclass
class StepResult:
    loss: torch.Tensor        # mean loss over the micro-batches: an fp32 scalar on the device
    grad_norm: torch.Tensor   # global gradient norm before clipping (a DTensor under FSDP)
    lr: float | None          # None: the step did not set it (see `lr` of train_step)


def train_step(loss_fn: Callable, micro_batches: Sequence, optimizer: torch.optim.Optimizer, parameters: list, *,
               lr: float | None, grad_clip: float, autocast=contextlib.nullcontext, scaler=None,
               sync: Callable[[bool], contextlib.AbstractContextManager] | None = None) -> StepResult:
    """One optimizer step over `micro_batches`; `grad_clip` <= 0 disables clipping (the norm is still measured).

    `lr=None` keeps the optimizer's learning rate as the caller set it: the step recorded into a
    CUDA graph must not write it, or every replay would restore the value it had when recorded."""
    if lr is not None:
        set_learning_rate(optimizer, lr)
    device = next(iter(parameters)).device
    loss_sum = torch.zeros((), device=device)
    n = len(micro_batches)
    for k, batch in enumerate(micro_batches):
        with sync(k == n - 1) if sync is not None else contextlib.nullcontext():
            with autocast():
                loss = loss_fn(batch) / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, norm, lr)


@dataclass
class StepRecord:
    """A step as read back on the host, for logs and metrics.jsonl."""
    step: int
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    tokens: int          # tokens trained in this step
    tokens_seen: int     # tokens trained in the whole run, this step included

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def row(self) -> dict:
        return {"kind": "train", "step": self.step, "tokens": self.tokens_seen, "loss": self.loss, "lr": self.lr,
                "norm": self.grad_norm, "ms": self.seconds * 1e3, "tok_s": self.tokens_per_second}


class PendingSteps:
    """Steps whose loss and norm are still on the device, read in one host sync by `read()`.

    On CPU every step's own time is exact (ops run when called). On a GPU the step only
    queues work, so `read()` synchronises once and spreads the interval's time evenly."""

    def __init__(self, device: torch.device):
        self.device = device
        self._steps: list[tuple[int, StepResult, tuple[int, int], float, float]] = []

    def add(self, step: int, result: StepResult, tokens: int, tokens_seen: int, started: float) -> None:
        """Step `step` (started at `started`, a perf_counter time) trained `tokens`, `tokens_seen` in all."""
        self._steps.append((step, result, (tokens, tokens_seen), started, time.perf_counter()))

    def __len__(self) -> int:
        return len(self._steps)

    def read(self, last_checkpoint=None) -> list[StepRecord]:
        """The pending steps as floats, oldest first; a non-finite loss is a one-line error."""
        if not self._steps:
            return []
        results = [result for _, result, *_ in self._steps]
        norms = [r.grad_norm.full_tensor() if hasattr(r.grad_norm, "full_tensor") else r.grad_norm for r in results]
        values = torch.stack([torch.stack([r.loss.float(), norm.float().to(r.loss.device)])
                              for r, norm in zip(results, norms, strict=True)]).tolist()  # the one host sync
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            even = (time.perf_counter() - self._steps[0][3]) / len(self._steps)
            seconds = [even] * len(self._steps)
        else:
            seconds = [end - start for *_, start, end in self._steps]
        records = [StepRecord(step, loss, norm, result.lr, s, *tokens)
                   for (step, result, tokens, *_), (loss, norm), s in zip(self._steps, values, seconds, strict=True)]
        self._steps.clear()
        for record in records:
            if not math.isfinite(record.loss):
                where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
                raise FastGPTError(f"loss became {record.loss} at step {record.step}: stopping without saving "
                                   f"(try a lower --lr or --dtype fp32){where}")
        return records
