"""Triton cross-entropy against a float64 PyTorch reference (interpreter on CPU, compiled on GPU)."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from conftest import DEVICE, GPU, requires_gpu
from kernel_checks import poison_outputs  # noqa: F401  (autouse fixture: outputs start as NaN)

from fastgpt import ops
from fastgpt.errors import FastGPTError
from fastgpt.kernels import cross_entropy
from fastgpt.kernels.cross_entropy import _row_start, cross_entropy_triton, launch_backward, launch_forward

# Relative precision of the gradient's storage dtype (the math is fp32 in every case).
EPS = {torch.float32: 2e-6 if not GPU else 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
IGNORE = -100


def make_case(N, V, dtype, seed=0, spread=4.0):
    """Random logits (already rounded to `dtype`) and targets with every third row ignored;
    the first rows aim at the vocabulary's edges (0 and V - 1)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen) * spread).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[: min(N, 2)] = torch.tensor([V - 1, 0])[: min(N, 2)]
    targets[2::3] = IGNORE
    return logits.to(DEVICE), targets.to(DEVICE)


def fp64_reference(logits, targets, reduction, grad_out):
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x, targets, ignore_index=IGNORE, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, x, grad_out.double())
    return loss.detach(), grad


def check_against_fp64(logits, targets, reduction, dtype):
    x = logits.detach().clone().requires_grad_()
    loss = cross_entropy_triton(x, targets, IGNORE, reduction)
    grad_out = torch.rand_like(loss) + 0.5
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    ref_loss, ref_grad = fp64_reference(logits, targets, reduction, grad_out)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    scale = ref_grad.abs().max().item() or 1.0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=EPS[dtype], atol=EPS[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,V", [(1, 1), (7, 31), (333, 1000), (3, 50257)])
def test_matches_fp64_per_row(N, V, dtype):
    """reduction='none' with a random grad_output: every row's loss and its own gradient scale."""
    logits, targets = make_case(N, V, dtype)
    check_against_fp64(logits, targets, "none", dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mean_and_sum(reduction, dtype):
    logits, targets = make_case(37, 300, dtype, seed=1)
    check_against_fp64(logits, targets, reduction, dtype)


def test_all_rows_ignored_matches_pytorch():
    """Mean over zero rows is nan (as in PyTorch); sum is 0; no gradient reaches any logit."""
    logits = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    targets = torch.full((4,), IGNORE, device=DEVICE)
    mean = cross_entropy_triton(logits, targets, IGNORE, "mean")
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(logits.detach(), targets, reduction="mean"))
    total = cross_entropy_triton(logits, targets, IGNORE, "sum")
    assert total.item() == 0.0
    (grad,) = torch.autograd.grad(total, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_custom_ignore_index():
    logits, targets = make_case(9, 40, torch.float32)
    targets[targets == IGNORE] = 7  # a real class id used as the ignore marker
    got = cross_entropy_triton(logits, targets, ignore_index=7)
    torch.testing.assert_close(got, F.cross_entropy(logits, targets, ignore_index=7))


def test_strided_rows_and_columns():
    """Rows with stride != V (a slice of a wider buffer), and a transposed view."""
    wide, targets = make_case(20, 117, torch.float32)
    logits = wide[:, 5:105]  # row stride 117, 100 columns
    targets = targets.clamp(max=99)  # ignored rows (-100) stay ignored
    assert logits.stride(0) != logits.shape[1]
    check_against_fp64(logits, targets, "none", torch.float32)
    transposed = wide[:, :20].t()  # column stride != 1
    targets_t = targets[:20].clamp(min=0, max=19)
    check_against_fp64(transposed, targets_t, "mean", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_output_element_written(dtype, monkeypatch):
    """NaN-poisoned loss and gradient buffers: an element a kernel forgets to write stays NaN.
    The in-place gradient over strided rows must also leave the gap between rows untouched.
    Blocks of 32 columns make each 70-wide row three blocks, the last one ragged."""
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_V", 32)
    N, V, pad = 11, 70, 9
    logits, targets = make_case(N, V + pad, dtype, seed=3)
    targets = targets.clamp(max=V - 1)  # ignored rows (-100) stay ignored
    view = logits[:, :V]
    loss = torch.full((N,), float("nan"), device=DEVICE)
    _, lse = launch_forward(view, targets, IGNORE, loss=loss)
    ref_loss, _ = fp64_reference(view, targets, "none", torch.ones(N, device=DEVICE))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)

    grad = torch.full((N, V), float("nan"), dtype=dtype, device=DEVICE)
    launch_backward(view, targets, lse, torch.ones(1, device=DEVICE), IGNORE, grad)
    assert not torch.isnan(grad).any()

    gap_before = logits[:, V:].clone()
    launch_forward(view, targets, IGNORE, grad_scale=torch.ones(1, device=DEVICE))  # grad in place
    torch.testing.assert_close(view, grad, rtol=0, atol=0)
    assert torch.equal(logits[:, V:], gap_before)


@triton.jit
def _row_start_probe(out_ptr, row_base, row_stride):
    row = tl.program_id(0) + row_base  # int32, like a program id
    tl.store(out_ptr + tl.program_id(0), _row_start(row, row_stride))


@triton.jit
def _int32_row_start_probe(out_ptr, row_base, row_stride):
    row = tl.program_id(0) + row_base
    tl.store(out_ptr + tl.program_id(0), (row * row_stride).to(tl.int64))


def test_row_offsets_are_64_bit():
    """Row 70000 of a 50257-wide matrix starts at element 3.5e9 > 2**31: the kernels' offset
    arithmetic gets it right, where plain int32 row * stride wraps around."""
    row_base, stride = 70_000, 50_257
    out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    _row_start_probe[(3,)](out, row_base, stride)
    expected = torch.tensor([(row_base + i) * stride for i in range(3)], device=DEVICE)
    assert torch.equal(out, expected) and expected[0] > 2**31
    _int32_row_start_probe[(3,)](out, row_base, stride)
    assert not torch.equal(out, expected)  # the probe can tell the difference


@requires_gpu
def test_more_than_2_31_elements_on_gpu():
    """43k rows of GPT-2's vocabulary (2.16e9 bf16 logits): the last rows' loss and in-place gradient."""
    N, V = 43_000, 50_257
    assert N * V > 2**31
    logits = torch.randn(N, V, dtype=torch.bfloat16, device="cuda")
    targets = torch.randint(0, V, (N,), device="cuda")
    tail = logits[-4:].float().clone()
    loss, _ = launch_forward(logits, targets, IGNORE, grad_scale=torch.ones(1, device="cuda"))
    ref_loss = F.cross_entropy(tail, targets[-4:], reduction="none")
    torch.testing.assert_close(loss[-4:], ref_loss, rtol=1e-5, atol=1e-5)
    ref_grad = torch.softmax(tail, -1) - F.one_hot(targets[-4:], V)
    torch.testing.assert_close(logits[-4:].float(), ref_grad, rtol=1e-2, atol=1e-3)


def test_compiles_without_graph_break():
    logits, targets = make_case(6, 40, torch.float32)
    x = logits.clone().requires_grad_()
    compiled = torch.compile(lambda a, t: cross_entropy_triton(a, t), backend="aot_eager", fullgraph=True)
    loss = compiled(x, targets)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    ref = logits.clone().requires_grad_()
    F.cross_entropy(ref, targets).backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_kernel_never_reads_an_out_of_range_target():
    """A bad target gives nan, not a read outside the row (the ops do not check targets:
    callers run ops.check_targets on the host batch)."""
    logits, targets = make_case(4, 10, torch.float32)
    targets[:] = torch.tensor([3, 10, -5, IGNORE])
    loss, _ = launch_forward(logits, targets, IGNORE)
    assert loss[0] > 0 and torch.isnan(loss[1]) and torch.isnan(loss[2]) and loss[3] == 0


@pytest.mark.parametrize("bad", [10, -1])
def test_check_targets_names_the_bad_target_in_one_line(bad):
    _, targets = make_case(5, 10, torch.float32)
    ops.check_targets(targets.cpu(), 10, IGNORE)  # valid targets (ignored ones included) pass
    targets[1] = bad
    with pytest.raises(FastGPTError, match=f"target {bad} is outside the vocabulary") as info:
        ops.check_targets(targets.cpu(), 10, IGNORE)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", ["reduction", "shape"])
def test_bad_input_raises_one_line_error(bad):
    logits, targets = make_case(5, 10, torch.float32)
    kwargs = {"ignore_index": IGNORE, "reduction": "mean"}
    if bad == "reduction":
        kwargs["reduction"] = "avg"
    else:
        targets = targets[:4]
    with pytest.raises(FastGPTError) as info:
        cross_entropy_triton(logits, targets, **kwargs)
    assert "\n" not in str(info.value)


def test_benchmark_smoke(tmp_path):
    """The benchmark's CPU size set runs end to end (timings are meaningless under the interpreter)."""
    from fastgpt.bench import kernels_ce
    rows = kernels_ce.run(DEVICE, "tiny", tmp_path, backends=("eager", "triton"))
    names = {(r.name, r.backend) for r in rows}
    for op in ("cross_entropy", "linear_cross_entropy"):
        for mode in ("eval", "forward", "backward", "full"):
            assert {(f"{op}.{mode}", "eager"), (f"{op}.{mode}", "triton")} <= names
    assert all(r.median > 0 for r in rows)
    assert (tmp_path / "kernels_ce.csv").read_text().count("\n") == len(rows) + 1
    assert "| cross_entropy.full |" in (tmp_path / "kernels_ce.md").read_text()
