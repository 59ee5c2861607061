"""The whole training step as one CUDA graph: forward, backward, clipping and fused AdamW of
every micro-batch, replayed by one call, so the host's ~750 launches per step (Triton's at
~100 us each) stop setting the pace.

How (the recipe of PyTorch's "whole network capture"):
  * the step recorded is `train_step` itself, the eager step every loop runs, so the two
    cannot drift apart: same kernels in the same order, hence the same numbers;
  * the batch goes into static device buffers (one copy per step, from pinned memory), which
    the recorded step reads; the loss function is the loop's own;
  * the learning rate is a device tensor refilled before each replay (`optim.make_capturable`);
    the recorded step never writes it (`train_step(lr=None)`);
  * the first `warmup_steps` steps run eagerly on a side stream (real steps, not rehearsals):
    they autotune the Triton kernels, create AdamW's state and settle the allocator, none of
    which may happen while recording;
  * the loss and gradient norm come back as a copy: the graph rewrites its outputs each replay,
    and `PendingSteps` keeps several steps before reading them.

Gradient accumulation: all micro-batches are recorded in the one graph. The first micro-batch's
backward writes the gradients and the others add to them, as in the eager step, so nothing
needs zeroing and a step is one replay. A graph of one micro-step replayed N times plus an
optimizer graph would record less (a smaller graph, a shorter first capture for large N), but
needs gradients zeroed inside a graph and N + 1 replays; a graph grows by the step's ~750
kernels per micro-batch, which CUDA graphs hold easily, and activations freed by one
micro-batch are reused by the next inside the graph's memory pool, as in eager mode.

Why not `torch.compile(mode="reduce-overhead")`: it graphs the compiled model's forward and
backward only (clipping and AdamW stay eager), it needs inductor to compile the model first
(minutes for GPT-2, and fused pointwise code whose loss is no longer the eager step's bit for
bit), and its graphs hand back outputs the next replay overwrites. Recording the step by hand
works on any torch with CUDA graphs, with or without --compile (a compiled model is recorded
like any other, after the warm-up steps compiled it).

What a graph cannot replay, the caller is told in one line and the eager step runs (`off_reason`).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch

from ..errors import FastGPTError
from .optim import make_capturable, set_learning_rate
from .step import StepResult, train_step


def off_reason(device: torch.device, *, world_size: int = 1, fp16_scaler: bool = False,
               activation_checkpointing: bool = False) -> str | None:
    """Why this run's step cannot be one CUDA graph, or None when it can."""
    if device.type != "cuda":
        return f"a CUDA graph needs a CUDA device (this run's is {device.type})"
    if world_size > 1:
        return "DDP/FSDP all-reduce gradients in hooks the graph does not record in order"
    if fp16_scaler:
        return "fp16's GradScaler changes its scale on the host after an overflow"
    if activation_checkpointing:
        return "activation checkpointing saves and restores RNG state on the host"
    return None


class CudaGraphs:
    """Records and replays with torch.cuda: warm-up on a side stream, capture, replay."""

    def __init__(self, device: torch.device):
        self.device = device

    def side_stream(self) -> contextlib.AbstractContextManager:
        """Run eagerly on a fresh stream that waits for the current one; the current one then waits for it."""
        return _SideStream(self.device)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record `fn` (nothing runs) and return the replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


class _SideStream:
    def __init__(self, device: torch.device):
        self.current = torch.cuda.current_stream(device)
        self.stream = torch.cuda.Stream(device)
        self.context = torch.cuda.stream(self.stream)

    def __enter__(self):
        self.stream.wait_stream(self.current)
        self.context.__enter__()

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        self.current.wait_stream(self.stream)


class _StagedBatches:
    """Host micro-batches -> one static device tensor (2, N, B, T) of inputs and targets.

    On CUDA through two pinned buffers in turn: a buffer is rewritten only after its copy of
    two steps ago has run, so the host never waits for the step before, and a pinned copy
    does not make the host wait for the stream as a pageable one may."""

    def __init__(self, micro_batches: Sequence, device: torch.device):
        host = self._stack(micro_batches)
        self.shape, self.dtype = host.shape, host.dtype
        self.tokens = torch.empty(host.shape, dtype=host.dtype, device=device)
        self.pinned = device.type == "cuda"
        pinned_buffers = 2 if self.pinned else 0
        self.buffers = [torch.empty(host.shape, dtype=host.dtype, pin_memory=True) for _ in range(pinned_buffers)]
        self.copied = [torch.cuda.Event() for _ in self.buffers]
        self.turn = 0

    @staticmethod
    def _stack(micro_batches: Sequence) -> torch.Tensor:
        xs, ys = zip(*micro_batches, strict=True)
        return torch.stack([torch.stack(xs), torch.stack(ys)])

    def views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.tokens[0, k], self.tokens[1, k]) for k in range(self.shape[1])]

    def load(self, micro_batches: Sequence) -> None:
        host = self._stack(micro_batches)
        if host.shape != self.shape or host.dtype != self.dtype:
            raise FastGPTError(f"cuda graph: the step was recorded for micro-batches {tuple(self.shape[1:])} "
                               f"{self.dtype}, got {tuple(host.shape[1:])} {host.dtype}; run with --no-cuda-graph")
        if not self.pinned:
            self.tokens.copy_(host)
            return
        buffer, copied = self.buffers[self.turn], self.copied[self.turn]
        copied.synchronize()  # its copy of two steps ago has run (returns at once when never recorded)
        buffer.copy_(host)
        self.tokens.copy_(buffer, non_blocking=True)
        copied.record()
        self.turn = 1 - self.turn


class GraphedTrainStep:
    """`train_step` recorded once into a graph and replayed: call it as `step(micro_batches, lr)`.

    `loss_fn`, `optimizer`, `parameters`, `grad_clip` and `autocast` are those of `train_step`.
    `graphs`: what records and replays (`CudaGraphs` on the parameters' device by default).
    """

    def __init__(self, loss_fn: Callable, optimizer: torch.optim.Optimizer, parameters: list, *, grad_clip: float,
                 autocast=contextlib.nullcontext, warmup_steps: int = 3, graphs=None):
        self.loss_fn, self.optimizer, self.parameters = loss_fn, optimizer, parameters
        self.grad_clip, self.autocast, self.warmup_steps = grad_clip, autocast, warmup_steps
        if warmup_steps < 1:
            raise FastGPTError(f"cuda graph: warmup_steps must be >= 1 (AdamW creates its state in its first step), "
                               f"got {warmup_steps}")
        self.device = next(iter(parameters)).device
        self.graphs = graphs if graphs is not None else CudaGraphs(self.device)
        make_capturable(optimizer, self.device)
        self.batches: _StagedBatches | None = None
        self.outputs: StepResult | None = None  # the recorded step's loss and norm, rewritten by each replay
        self.replay: Callable[[], None] | None = None
        self.eager_steps = 0

    def _step(self) -> StepResult:
        return train_step(self.loss_fn, self.batches.views(), self.optimizer, self.parameters, lr=None,
                          grad_clip=self.grad_clip, autocast=self.autocast)

    def _record(self) -> None:
        self.outputs = self._step()

    def __call__(self, micro_batches: Sequence, lr: float) -> StepResult:
        if self.batches is None:
            self.batches = _StagedBatches(micro_batches, self.device)
        self.batches.load(micro_batches)
        set_learning_rate(self.optimizer, lr)
        if self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            with self.graphs.side_stream(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*capturable=True.*without CUDA graph capture")  # meant
                result = self._step()
            return StepResult(result.loss, result.grad_norm, lr)
        if self.replay is None:
            self.replay = self.graphs.capture(self._record)
        self.replay()
        values = torch.stack([self.outputs.loss, self.outputs.grad_norm])  # a copy: the next replay overwrites
        return StepResult(values[0], values[1], lr)
