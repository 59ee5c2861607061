"""The shared training step: no host reads between log intervals, a loss callable (any batch -> loss),
gradient clipping that is measured, logged and applied, and the loops reading losses only when they log."""
from __future__ import annotations

import json

import pytest
import torch
from graph_replay import ReplayCheck
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import tiny_options, word_text

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT
from fastgpt.train import TrainConfig, train
from fastgpt.train.batches import BatchPlan
from fastgpt.train.cuda_graph import GraphedTrainStep
from fastgpt.train.optim import make_optimizer
from fastgpt.train.resolve import build_model, load_data
from fastgpt.train.schedule import learning_rate
from fastgpt.train.step import PendingSteps, train_step

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
              torch.ops.aten.is_nonzero.default}


class CountHostReads(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (`.item()`, `bool(t)`, `float(t)`)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _tiny_model_and_batches(accum=2):
    torch.manual_seed(0)
    model = GPT(TrainConfig(preset="tiny", n_embd=32, n_head=2, n_layer=2, context_length=16).model_config())
    batches = [(torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))) for _ in range(accum)]
    return model, batches


@pytest.mark.parametrize("backend, accum", [("torch", 2), ("triton", 1)])  # Triton: the interpreter is slow
def test_a_pretraining_step_reads_nothing_on_the_host(backend, accum):
    model, batches = _tiny_model_and_batches(accum)
    ops.set_backend(backend)
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    parameters = list(model.parameters())
    pending = PendingSteps(torch.device("cpu"))
    train_step(lambda b: model(*b), batches, optimizer, parameters, lr=1e-3, grad_clip=1.0)  # warm-up: lazy state
    with CountHostReads() as counter:
        for step in range(2):
            result = train_step(lambda b: model(*b), batches, optimizer, parameters, lr=1e-3, grad_clip=1.0,
                                scaler=torch.amp.GradScaler("cpu", enabled=False))
            pending.add(step + 1, result, 32 * accum, 32 * accum * (step + 1), 0.0)
    assert counter.reads == []
    records = pending.read()  # the one read, at the log interval
    assert [r.step for r in records] == [1, 2] and all(r.loss > 0 and r.grad_norm > 0 for r in records)


def test_the_graph_step_reads_nothing_on_the_host():
    """The CUDA-graph step (its CPU stand-in): staging the batch, the learning rate, the eager warm-up
    steps, recording and replays read no device value back either."""
    model, batches = _tiny_model_and_batches(accum=2)
    ops.set_backend("torch")
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    parameters = list(model.parameters())
    check = ReplayCheck(optimizer, parameters)
    step = GraphedTrainStep(lambda b: model(*b), optimizer, parameters, grad_clip=1.0, warmup_steps=1, graphs=check)
    pending = PendingSteps(torch.device("cpu"))
    with CountHostReads() as counter:
        for k in range(3):  # eager, recorded + replayed, replayed
            pending.add(k + 1, step(batches, 1e-3 * (k + 1)), 64, 64 * (k + 1), 0.0)
    assert counter.reads == [] and check.replays == 2
    assert [r.lr for r in pending.read()] == [1e-3, 2e-3, 3e-3]


def test_the_step_takes_any_batch_to_loss_function():
    """A loss that is not `model(x, y)` (as DPO's will be): the step only needs a scalar."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    batches = [{"a": torch.ones(3)}, {"a": 2 * torch.ones(3)}]
    before = weight.detach().clone()
    result = train_step(lambda batch: (weight * batch["a"]).sum(), batches, optimizer, [weight], lr=0.1, grad_clip=0)
    # mean over the two micro-batches: gradient (1 + 2) / 2 per element, norm 1.5 * sqrt(3)
    assert result.loss.item() == pytest.approx((before.sum() * 1.5).item(), rel=1e-6)
    assert result.grad_norm.item() == pytest.approx(1.5 * 3 ** 0.5, rel=1e-6)
    torch.testing.assert_close(weight.detach(), before - 0.1 * 1.5, rtol=0, atol=1e-7)
    assert weight.grad is None  # zeroed for the next step


def test_clipping_scales_the_gradient_to_the_limit():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    target = torch.tensor([3.0, -4.0, 0.0, 0.0]) + weight.detach()  # gradient of 0.5 |w - t|^2 is w - t: norm 5
    before = weight.detach().clone()
    result = train_step(lambda t: 0.5 * ((weight - t) ** 2).sum(), [target], optimizer, [weight], lr=1.0,
                        grad_clip=0.5)
    assert result.grad_norm.item() == pytest.approx(5.0, rel=1e-6)  # measured before clipping
    expected = before - torch.tensor([-3.0, 4.0, 0.0, 0.0]) * (0.5 / (5.0 + 1e-6))
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-6)


def test_non_finite_loss_is_reported_with_its_step():
    pending = PendingSteps(torch.device("cpu"))
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step, value in enumerate([1.0, float("nan")], 1):
        result = train_step(lambda v: (weight * v).sum(), [torch.full((2,), value)], optimizer, [weight], lr=0.1,
                            grad_clip=1.0)
        pending.add(step, result, 2, 2 * step, 0.0)
    with pytest.raises(FastGPTError, match=r"^loss became nan at step 2: .*; the last good checkpoint is ck$"):
        pending.read(last_checkpoint="ck")


def test_pretraining_logs_the_clipped_step_and_its_norm(tmp_path):
    """One logged step of `train` equals AdamW applied to the clipped gradient, and the logged norm is the
    gradient's norm before clipping. eps=1 makes the AdamW update ~ lr * g, so clipping shows in the weights."""
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "run", max_steps=1, grad_clip=0.05, eps=1.0, weight_decay=0.0,
                           warmup_steps=0, lr=1e-2, min_lr=1e-2)
    result = train(TrainConfig(**options))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cfg = TrainConfig(**options)
    train_split, val_split, _ = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    plan = BatchPlan(train_split, val_split, 16, cfg.micro_batch, 1, 1, 0, cfg.seed, cfg.sampling)
    (x, y), = plan.micro_batches(0)
    model(x, y).backward()
    grads = [p.grad for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()
    assert norm > 10 * cfg.grad_clip  # clipping is active
    assert logged[0]["kind"] == "train" and logged[0]["norm"] == pytest.approx(norm, rel=1e-5)

    def adamw_after(scale: float) -> dict:
        copy = build_model(cfg)
        copy.load_state_dict(model.state_dict())
        for p, g in zip(copy.parameters(), grads, strict=True):
            p.grad = g * scale
        torch.optim.AdamW(copy.parameters(), lr=learning_rate(0, cfg.lr, cfg.min_lr, 0, 1),
                          betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.0).step()
        return copy.state_dict()

    from fastgpt.train.checkpoint import load_model_state
    _, trained, _ = load_model_state(result.checkpoint / "model")
    clipped, unclipped = adamw_after(cfg.grad_clip / (norm + 1e-6)), adamw_after(1.0)
    for name, value in trained.items():
        torch.testing.assert_close(value, clipped[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.allclose(trained[k], unclipped[k], rtol=1e-3, atol=1e-6) for k in trained)


def test_the_loop_reads_losses_only_at_log_eval_and_checkpoint_steps(tmp_path, monkeypatch):
    reads = []
    original = PendingSteps.read

    def counting_read(self, *args, **kwargs):
        records = original(self, *args, **kwargs)
        reads.append([r.step for r in records])
        return records
    monkeypatch.setattr(PendingSteps, "read", counting_read)
    text = word_text(tmp_path / "words.txt")
    result = train(TrainConfig(**tiny_options(text, tmp_path / "run", max_steps=7, log_interval=3, eval_interval=0,
                                              ckpt_interval=5)))
    assert reads == [[1, 2, 3], [4, 5], [6], [7]]  # log at 3 and 6, checkpoint at 5, the end at 7
    assert len(result.losses) == 7
