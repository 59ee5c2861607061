"""The training step recorded as one CUDA graph (fastgpt/train/cuda_graph.py).

Without a GPU the step cannot be recorded: `graph_replay.ReplayCheck` stands in for `CudaGraphs`
and checks what a replay depends on (see there). On a GPU (`pytest -m gpu`) the real graph is
compared with the eager step.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import requires_gpu
from graph_replay import ReplayCheck
from train_helpers import tiny_options, word_text

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT
from fastgpt.train import TrainConfig, loop, train
from fastgpt.train.cuda_graph import GraphedTrainStep, off_reason
from fastgpt.train.optim import make_capturable, make_optimizer, portable_state
from fastgpt.train.step import train_step


def _tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(TrainConfig(preset="tiny", n_embd=32, n_head=2, n_layer=2, context_length=16).model_config())


def _batches(steps, accum, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[(torch.randint(0, 50257, (2, 16), generator=generator),
              torch.randint(0, 50257, (2, 16), generator=generator)) for _ in range(accum)] for _ in range(steps)]


LRS = [1e-3, 3e-3, 2e-3, 1.5e-3, 7e-4, 5e-4]


def _eager_run(model, batches, capturable: bool):
    optimizer = make_optimizer(model, LRS[0], 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    if capturable:
        make_capturable(optimizer, torch.device("cpu"))
    parameters = list(model.parameters())
    results = [train_step(lambda b: model(*b), micro, optimizer, parameters, lr=lr, grad_clip=1.0)
               for micro, lr in zip(batches, LRS, strict=False)]
    return [(r.loss.item(), r.grad_norm.item()) for r in results]


def test_the_recorded_step_replays_the_eager_step_bit_for_bit():
    ops.set_backend("torch")  # the reference ops are visible to the op log (Triton's interpreter is not)
    batches = _batches(len(LRS), accum=2)
    eager_model, graphed_model = _tiny(), _tiny()
    eager = _eager_run(eager_model, batches, capturable=False)

    optimizer = make_optimizer(graphed_model, LRS[0], 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    parameters = list(graphed_model.parameters())
    check = ReplayCheck(optimizer, parameters)
    step = GraphedTrainStep(lambda b: graphed_model(*b), optimizer, parameters, grad_clip=1.0, warmup_steps=2,
                            graphs=check)
    results = [step(micro, lr) for micro, lr in zip(batches, LRS, strict=True)]
    graphed = [(r.loss.item(), r.grad_norm.item()) for r in results]

    assert check.side_streams == 2 and check.replays == len(LRS) - 2  # 2 eager steps, then one replay per step
    assert [r.lr for r in results] == LRS
    assert graphed == eager  # losses and norms: the later ones depend on every earlier update
    for (name, a), b in zip(eager_model.state_dict().items(), graphed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # and a float learning rate updates as the tensor one does (both rounded to fp32)
    assert _eager_run(_tiny(), batches, capturable=True) == eager


def test_the_check_catches_a_learning_rate_written_inside_the_recording():
    """A step that sets its learning rate while recorded would replay the first one forever."""
    ops.set_backend("torch")
    model = _tiny()
    optimizer = make_optimizer(model, LRS[0], 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    parameters = list(model.parameters())
    step = GraphedTrainStep(lambda b: model(*b), optimizer, parameters, grad_clip=1.0, warmup_steps=1,
                            graphs=ReplayCheck(optimizer, parameters))
    lrs = iter(LRS)
    step._step = lambda: train_step(step.loss_fn, step.batches.views(), optimizer, parameters, lr=next(lrs),
                                    grad_clip=1.0)
    batches = _batches(2, 1)
    step(batches[0], LRS[0])  # eager
    with pytest.raises(AssertionError, match=r"replay differs from the recording at op \d+: .*fill_"):
        step(batches[1], LRS[1])  # recorded with one learning rate, replayed with the next


def test_a_new_batch_shape_is_one_line():
    ops.set_backend("torch")
    model = _tiny()
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    step = GraphedTrainStep(lambda b: model(*b), optimizer, list(model.parameters()), grad_clip=1.0,
                            graphs=ReplayCheck(optimizer, list(model.parameters())))
    step(_batches(1, 1)[0], 1e-3)
    with pytest.raises(FastGPTError, match=r"^cuda graph: the step was recorded for micro-batches \(1, 2, 16\)"):
        step(_batches(1, 2)[0], 1e-3)
    with pytest.raises(FastGPTError, match="warmup_steps must be >= 1"):
        GraphedTrainStep(lambda b: model(*b), optimizer, list(model.parameters()), grad_clip=1.0, warmup_steps=0)


def test_what_a_graph_cannot_replay_runs_eagerly():
    cuda = torch.device("cuda")
    assert off_reason(cuda) is None
    assert "CUDA device" in off_reason(torch.device("cpu"))
    assert "DDP/FSDP" in off_reason(cuda, world_size=2)
    assert "GradScaler" in off_reason(cuda, fp16_scaler=True)
    assert "activation checkpointing" in off_reason(cuda, activation_checkpointing=True)


def test_checkpoints_store_a_float_learning_rate():
    model = _tiny()
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    make_capturable(optimizer, torch.device("cpu"))
    train_step(lambda b: model(*b), _batches(1, 1)[0], optimizer, list(model.parameters()), lr=2e-3, grad_clip=1.0)
    state = portable_state(optimizer.state_dict())
    assert [g["lr"] for g in state["param_groups"]] == [pytest.approx(2e-3)] * 2
    assert not any(g["capturable"] for g in state["param_groups"])
    assert all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups)  # the optimizer keeps its own
    fresh = make_optimizer(_tiny(), 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    fresh.load_state_dict(copy.deepcopy(state))
    assert isinstance(fresh.param_groups[0]["lr"], float)


def test_the_loop_trains_the_same_through_the_recorded_step(tmp_path, monkeypatch, capsys):
    """`train` with the graph step (the CPU stand-in) logs the losses of the eager step, saves a
    checkpoint an eager run resumes from, and names why it runs eagerly when it must."""
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "eager", max_steps=6, backend="torch", tokens_per_step=128,
                           cuda_graph=False)
    eager = train(TrainConfig(**options))
    made = []

    def graphed_on_cpu(loss_fn, optimizer, parameters, **kwargs):
        made.append(GraphedTrainStep(loss_fn, optimizer, parameters, graphs=ReplayCheck(optimizer, parameters),
                                     **kwargs))
        return made[-1]
    monkeypatch.setattr(loop, "off_reason", lambda *a, **k: None)
    monkeypatch.setattr(loop, "GraphedTrainStep", graphed_on_cpu)
    graphed = train(TrainConfig(**{**options, "out_dir": str(tmp_path / "graph"), "cuda_graph": True}))
    assert made and made[0].replay is not None and made[0].graphs.replays == 3  # accumulation 2, 3 eager steps
    assert graphed.losses == eager.losses
    resumed = train(TrainConfig(**{**options, "max_steps": 7}), resume=str(graphed.checkpoint))
    assert resumed.step == 7

    monkeypatch.undo()
    capsys.readouterr()
    train(TrainConfig(**{**options, "out_dir": str(tmp_path / "cpu"), "cuda_graph": True, "max_steps": 1}),
          explicit={"cuda_graph"}, log=print)
    notes = [line for line in capsys.readouterr().out.splitlines() if "--cuda-graph" in line]
    assert notes == ["--cuda-graph: the eager step runs instead (a CUDA graph needs a CUDA device (this run's is cpu))"]


# ---------------------------------------------------------------------------------------- on a GPU
def _gpu_model(dtype_seed=0):
    torch.manual_seed(dtype_seed)
    return GPT(TrainConfig(preset="tiny", n_embd=64, n_head=2, n_layer=2, context_length=64).model_config()).cuda()


def _gpu_runs(autocast, steps: int = 6, accum: int = 2):
    generator = torch.Generator().manual_seed(3)
    batches = [[(torch.randint(0, 50257, (4, 64), generator=generator),
                 torch.randint(0, 50257, (4, 64), generator=generator)) for _ in range(accum)] for _ in range(steps)]
    lrs = [1e-3 * (1 + k % 3) for k in range(steps)]
    cuda = torch.device("cuda")
    eager_model, graphed_model = _gpu_model(), _gpu_model()
    optimizer = make_optimizer(eager_model, lrs[0], 0.1, (0.9, 0.95), 1e-8, cuda)
    eager = [train_step(lambda b: eager_model(b[0].cuda(), b[1].cuda()), micro, optimizer,
                        list(eager_model.parameters()), lr=lr, grad_clip=1.0, autocast=autocast)
             for micro, lr in zip(batches, lrs, strict=True)]
    optimizer = make_optimizer(graphed_model, lrs[0], 0.1, (0.9, 0.95), 1e-8, cuda)
    step = GraphedTrainStep(lambda b: graphed_model(b[0].cuda(), b[1].cuda()), optimizer,
                            list(graphed_model.parameters()), grad_clip=1.0, autocast=autocast, warmup_steps=2)
    graphed = [step(micro, lr) for micro, lr in zip(batches, lrs, strict=True)]
    assert step.replay is not None
    values = lambda results: torch.stack([torch.stack([r.loss, r.grad_norm]) for r in results]).cpu()  # noqa: E731
    return values(eager), values(graphed), eager_model, graphed_model


# Exact: the graph replays the eager step's kernels on the same data, and no kernel of fastgpt's uses
# atomics (a kernel that did would make two eager runs differ too; compare within fp32 rounding then).
@requires_gpu
@pytest.mark.gpu
def test_gpu_graph_step_is_bit_identical_to_the_eager_step_in_fp32():
    ops.set_backend("triton")
    eager, graphed, eager_model, graphed_model = _gpu_runs(contextlib.nullcontext)
    assert torch.equal(eager, graphed), (eager, graphed)
    for (name, a), b in zip(eager_model.state_dict().items(), graphed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@requires_gpu
@pytest.mark.gpu
def test_gpu_graph_step_matches_the_eager_step_under_bf16_autocast():
    ops.set_backend("triton")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    eager, graphed, _, _ = _gpu_runs(autocast)
    torch.testing.assert_close(graphed, eager, rtol=1e-2, atol=1e-3)


@requires_gpu
@pytest.mark.gpu
def test_gpu_pretraining_with_and_without_the_graph(tmp_path, capsys):
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "graph", device="cuda", dtype="fp32", backend="triton", max_steps=8,
                           n_embd=64, tokens_per_step=128, cuda_graph=True)
    graphed = train(TrainConfig(**options), log=print)
    assert "--cuda-graph" not in capsys.readouterr().out  # no fallback note: the graph ran
    eager = train(TrainConfig(**{**options, "out_dir": str(tmp_path / "eager"), "cuda_graph": False}))
    assert graphed.losses == eager.losses


@requires_gpu
@pytest.mark.gpu
def test_gpu_graph_records_a_compiled_model(tmp_path):
    """--compile with --cuda-graph: the warm-up steps compile, the graph records the compiled step."""
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "graph", device="cuda", dtype="bf16", backend="triton", max_steps=6,
                           n_embd=64, compile=True, cuda_graph=True)
    graphed = train(TrainConfig(**options))
    eager = train(TrainConfig(**{**options, "out_dir": str(tmp_path / "eager"), "cuda_graph": False}))
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=1e-3, atol=0)
