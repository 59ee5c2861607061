"""Triton launches per training step, pinned per kernel, so a change that adds launches is seen.

On an H100 each Triton launch costs ~100 us of host time against 10-40 us of kernel time
(issue 11), so the launch count of an eager step is a speed budget. Counted here under
TRITON_INTERPRET=1 by wrapping `kernel[grid]` (an autotuner's own trial runs are not launches
of the step and are not counted). The expectation is written per layer and per model: when a
kernel change is meant to change it (e.g. attention's backward in one launch per layer),
update the numbers below. The optimizer is pinned too: fused AdamW, one call per parameter group.
"""
from __future__ import annotations

import collections
import inspect

import pytest
import torch
from conftest import INTERPRETER
from torch.utils._python_dispatch import TorchDispatchMode

from fastgpt import ops
from fastgpt.model import GPT
from fastgpt.train import TrainConfig
from fastgpt.train.optim import make_optimizer
from fastgpt.train.step import train_step

pytestmark = pytest.mark.skipif(not (ops.TRITON_AVAILABLE and INTERPRETER),
                                reason="counts launches under the Triton interpreter (TRITON_INTERPRET=1)")

N_LAYER = 2
PER_LAYER = {  # launches of one block in one step (forward + backward)
    "attention._attn_fwd_kernel": 1,
    "attention._attn_bwd_kernel": 1,        # under the interpreter; a GPU launches its two phases apart
    "gelu._bias_gelu_fwd_kernel": 1,
    "gelu._bias_gelu_bwd_kernel": 1,
    "layernorm._layer_norm_fwd_kernel": 2,  # ln_1, and ln_2 fused with the residual add
    "layernorm._layer_norm_bwd_kernel": 2,
    "layernorm._layer_norm_bwd_reduce_kernel": 2,  # dweight and dbias of each, from the partials
}
PER_MODEL = {  # launches outside the blocks
    "layernorm._layer_norm_fwd_kernel": 1,  # ln_f
    "layernorm._layer_norm_bwd_kernel": 1,
    "layernorm._layer_norm_bwd_reduce_kernel": 1,
    "cross_entropy._cross_entropy_fwd_kernel": 1,  # LM head + loss; its forward writes the logits' gradient
}


def _kernel_name(kernel) -> str:
    """`module.function` of a @triton.jit kernel, through autotuner/heuristics wrappers."""
    while not inspect.isfunction(kernel) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return f"{kernel.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}"


@pytest.fixture
def launches(monkeypatch):
    from triton.runtime.jit import KernelInterface
    counts = collections.Counter()
    launcher_of = KernelInterface.__getitem__

    def counting(self, grid):
        launch = launcher_of(self, grid)

        def counted(*args, **kwargs):
            counts[_kernel_name(self)] += 1
            return launch(*args, **kwargs)
        return counted
    monkeypatch.setattr(KernelInterface, "__getitem__", counting)
    return counts


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_triton_launches_per_training_step(launches):
    torch.manual_seed(0)
    ops.set_backend("triton")
    model = GPT(TrainConfig(preset="tiny", n_embd=32, n_head=2, n_layer=N_LAYER, context_length=16).model_config())
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    batch = [(torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16)))]
    with CountOps() as torch_ops:
        train_step(lambda b: model(*b), batch, optimizer, list(model.parameters()), lr=1e-3, grad_clip=1.0)

    expected = collections.Counter({name: N_LAYER * n for name, n in PER_LAYER.items()})
    expected.update(PER_MODEL)
    counted = dict(sorted(launches.items()))
    assert counted == dict(sorted(expected.items())), (
        f"Triton launches per step changed: {sum(counted.values())} counted, {sum(expected.values())} expected "
        f"({N_LAYER} layers)\n  counted:  {counted}\n  expected: {dict(sorted(expected.items()))}")
    assert torch_ops.counts["aten._fused_adamw_.default"] == len(optimizer.param_groups), (
        f"AdamW is not one fused call per parameter group: {torch_ops.counts['aten._fused_adamw_.default']} calls")
