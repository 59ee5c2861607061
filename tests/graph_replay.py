"""`ReplayCheck`: what stands in for `fastgpt.train.cuda_graph.CudaGraphs` on a CPU.

A CPU cannot record a CUDA graph, so a replay reruns the recorded function, and the stand-in checks
what a real replay depends on and an eager run would hide: while recording, no value is read back
to the host and no tensor is made from Python data (on CUDA: an illegal host copy), and every
replay issues the very ops, shapes and Python numbers that were recorded (a graph replays those; a
step whose Python changed after recording, such as a learning rate written inside it or AdamW
creating its state, would be silently wrong). Recording runs nothing on a GPU, so the stand-in
puts the parameters and the optimizer state back after its recording run.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
              torch.ops.aten.is_nonzero.default}
FROM_PYTHON_DATA = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


class OpLog(TorchDispatchMode):
    """Each op as (name, its arguments' shapes and Python numbers)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves, _ = tree_flatten((args, kwargs or {}))
        described = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in leaves
                          if isinstance(x, (torch.Tensor, int, float, bool)))
        self.ops.append((func, described))
        return func(*args, **(kwargs or {}))


class ReplayCheck:
    """`CudaGraphs` on the CPU: a replay reruns the recorded function and must issue the recorded ops."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list):
        self.optimizer, self.parameters = optimizer, parameters
        self.side_streams = self.replays = 0
        self.recorded = None

    @contextlib.contextmanager
    def side_stream(self):
        self.side_streams += 1
        yield

    def _state_tensors(self) -> list[torch.Tensor]:
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [p.data for p in self.parameters] + state

    def capture(self, fn):
        saved = [t.clone() for t in self._state_tensors()]
        with OpLog() as log:
            fn()
        for tensor, value in zip(self._state_tensors(), saved, strict=True):  # recording runs nothing
            tensor.copy_(value)
        bad = [str(func) for func, _ in log.ops if func in HOST_READS | FROM_PYTHON_DATA]
        assert not bad, f"while recording: {bad}"
        self.recorded = log.ops

        def replay():
            with OpLog() as again:
                fn()
            for k, (was, now) in enumerate(zip(self.recorded, again.ops, strict=False)):
                assert was == now, f"replay differs from the recording at op {k}: recorded {was}, now {now}"
            assert len(again.ops) == len(self.recorded), f"{len(self.recorded)} ops recorded, {len(again.ops)} now"
            self.replays += 1
        return replay
