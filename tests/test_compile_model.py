"""torch.compile over the whole model: fullgraph, no graph break, same numbers as eager.

Dynamo must trace through `fastgpt.ops` (the dispatch point) and into the kernels'
custom ops, for inference and for a training step, on both backends: the PyTorch
reference and the Triton kernels (under the interpreter on CPU). backend="aot_eager"
traces the forward with Dynamo and the backward with AOTAutograd, as inductor does,
without generating code, so it runs on any machine.
"""
import pytest
import torch
from conftest import DEVICE, varied_tiny_model

from fastgpt import ops
from fastgpt.config import preset
from fastgpt.model import GPT

BACKENDS = ["torch", "auto", "triton"]  # auto on a CPU: PyTorch's fused kernels and torch_fused.py


def _batch(model, B=2, T=24):
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
    targets = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
    return idx.to(DEVICE), targets.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_no_graph_breaks(backend, training):
    """Also with attention dropout on (training), whose branch goes through the same choice point."""
    model = GPT(preset("tiny", dropout=0.1 if training else 0.0)).to(DEVICE).train(training)
    idx, targets = _batch(model)
    torch._dynamo.reset()
    with ops.use_backend(backend):
        explanation = torch._dynamo.explain(model)(idx, targets if training else None)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_breaks_under_autocast(backend):
    """The kernels read the autocast state (LayerNorm writes the autocast dtype): still one graph."""
    model = GPT(preset("tiny")).to(DEVICE).train()
    idx, targets = _batch(model)
    torch._dynamo.reset()
    with ops.use_backend(backend), torch.autocast(DEVICE, dtype=torch.float16):
        explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_logits_equal_eager(backend):
    model = varied_tiny_model().to(DEVICE)
    idx, _ = _batch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with ops.use_backend(backend), torch.no_grad():
        eager, traced = model(idx), compiled(idx)
    # The same kernels run in the same order; only the dispatch differs.
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_equals_eager(backend):
    """Loss and every parameter's gradient of one training step (dropout off: same randomness)."""
    model = varied_tiny_model().to(DEVICE).train()
    idx, targets = _batch(model)

    def step(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(idx, targets)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with ops.use_backend(backend):
        loss_e, grads_e = step(model)
        loss_c, grads_c = step(compiled)
    # AOTAutograd may sum a tied weight's two gradients in the other order: a few fp32 ulps.
    # auto's eager loss writes the logits' gradient in its forward, its compiled one is
    # autograd's (torch_fused.linear_cross_entropy_fused): the same sums, rounded elsewhere.
    atol = 1e-6 if backend == "auto" else 1e-7
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=atol, msg=name)
