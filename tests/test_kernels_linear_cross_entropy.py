"""Fused LM head + cross-entropy against a float64 reference that builds the full logits."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, GPU, requires_gpu
from kernel_checks import poison_outputs  # noqa: F401  (autouse fixture: outputs start as NaN)

from fastgpt.errors import FastGPTError
from fastgpt.kernels.linear_cross_entropy import default_chunk_rows, linear_cross_entropy_triton

IGNORE = -100
# fp32: the matmuls are TF32 on GPU. fp16/bf16: the logits chunk and the gradients are stored
# in that dtype, so errors scale with its precision.
TOL = {torch.float32: 1e-5 if not GPU else 2e-3, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def make_case(N, C, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=gen).to(dtype)
    weight = (torch.randn(V, C, generator=gen) / C**0.5 * 2).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[2::3] = IGNORE
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def fp64_reference(hidden, weight, targets, reduction, grad_out):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE, reduction=reduction)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w), grad_out.double())
    return loss.detach(), grad_h, grad_w


def assert_close_scaled(got, ref, tol):
    """Elementwise closeness relative to the tensor's largest reference magnitude."""
    scale = ref.abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * scale, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,C,V,chunk_rows", [
    (7, 16, 31, None),     # one chunk
    (33, 32, 1000, 8),     # five chunks, the last one short
    (5, 8, 50257, 2),      # GPT-2's vocabulary, chunks of two rows
])
def test_matches_fp64(N, C, V, chunk_rows, dtype, reduction):
    hidden, weight, targets = make_case(N, C, V, dtype)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy_triton(h, w, targets, IGNORE, reduction, chunk_rows=chunk_rows)
    grad_out = torch.rand_like(loss) + 0.5
    grad_h, grad_w = torch.autograd.grad(loss, (h, w), grad_out)
    ref_loss, ref_h, ref_w = fp64_reference(hidden, weight, targets, reduction, grad_out)
    assert loss.dtype == torch.float32 and grad_h.dtype == dtype and grad_w.dtype == dtype
    assert_close_scaled(loss, ref_loss, TOL[dtype])
    assert_close_scaled(grad_h, ref_h, TOL[dtype])
    assert_close_scaled(grad_w, ref_w, TOL[dtype])
    assert torch.equal(grad_h[2::3], torch.zeros_like(grad_h[2::3]))  # ignored rows get no gradient


def test_tied_weight_gets_both_gradients():
    """The LM head shares its matrix with the token embedding: the weight's gradient is the
    embedding lookup's plus the head's, exactly as with unfused logits."""
    V, C, N = 300, 24, 21
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    targets[::4] = IGNORE
    mixer = torch.randn(C, C, generator=gen, dtype=torch.float64).to(DEVICE)
    start = torch.randn(V, C, generator=gen, dtype=torch.float64).to(DEVICE) * 0.1

    def run(fused: bool):
        embedding = torch.nn.Embedding(V, C).to(device=DEVICE, dtype=torch.float32 if fused else torch.float64)
        with torch.no_grad():
            embedding.weight.copy_(start)
        hidden = torch.tanh(embedding(idx) @ mixer.to(embedding.weight.dtype))
        if fused:
            loss = linear_cross_entropy_triton(hidden, embedding.weight, targets, IGNORE, "mean", chunk_rows=4)
        else:
            loss = F.cross_entropy(hidden @ embedding.weight.t(), targets, ignore_index=IGNORE)
        loss.backward()
        return loss.detach(), embedding.weight.grad

    loss, grad = run(fused=True)
    ref_loss, ref_grad = run(fused=False)
    assert_close_scaled(loss, ref_loss, TOL[torch.float32])
    assert_close_scaled(grad, ref_grad, TOL[torch.float32])
    # Rows never looked up carry only the head's gradient; looked-up rows the embedding's too.
    w = start.clone().requires_grad_()
    F.cross_entropy(torch.tanh(start[idx] @ mixer) @ w.t(), targets, ignore_index=IGNORE).backward()
    looked_up = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    looked_up[idx] = True
    assert_close_scaled(grad[~looked_up], w.grad[~looked_up], TOL[torch.float32])
    assert (grad[looked_up].double() - w.grad[looked_up]).abs().max() > 1e-3


def test_no_grad_gives_same_loss():
    """Evaluation (no autograd): loss only, no gradient work."""
    hidden, weight, targets = make_case(13, 16, 200, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy_triton(hidden, weight, targets, IGNORE, "mean", chunk_rows=4)
    ref = F.cross_entropy(hidden.double() @ weight.double().t(), targets, ignore_index=IGNORE)
    assert_close_scaled(loss, ref, TOL[torch.float32])


def test_all_rows_ignored():
    hidden, weight, targets = make_case(6, 8, 50, torch.float32)
    targets.fill_(IGNORE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy_triton(h, w, targets, IGNORE, "mean", chunk_rows=4)
    assert torch.isnan(loss)  # as F.cross_entropy: a mean over zero rows
    loss_sum = linear_cross_entropy_triton(h, w, targets, IGNORE, "sum", chunk_rows=4)
    grad_h, grad_w = torch.autograd.grad(loss_sum, (h, w))
    assert loss_sum.item() == 0.0 and not grad_h.any() and not grad_w.any()


def test_only_weight_needs_grad():
    hidden, weight, targets = make_case(9, 8, 64, torch.float32)
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy_triton(hidden, w, targets, IGNORE, "sum", chunk_rows=4)
    (grad_w,) = torch.autograd.grad(loss, w)
    _, _, ref_w = fp64_reference(hidden, weight, targets, "sum", torch.ones((), device=DEVICE))
    assert_close_scaled(grad_w, ref_w, TOL[torch.float32])


def test_autocast_matches_reference_under_autocast():
    """fp32 parameters under bf16 autocast: both operands run in bf16, gradients return in fp32."""
    from fastgpt.kernels.linear_cross_entropy import linear_cross_entropy_reference
    hidden, weight, targets = make_case(10, 16, 50, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = linear_cross_entropy_triton(h, w, targets, IGNORE, "mean", chunk_rows=4)
        ref = linear_cross_entropy_reference(h, w, targets, IGNORE, "mean")
    grads = torch.autograd.grad(loss, (h, w))
    ref_grads = torch.autograd.grad(ref, (h, w))
    assert all(g.dtype == torch.float32 for g in grads)
    assert_close_scaled(loss, ref.double(), TOL[torch.bfloat16])
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_scaled(got, expected.double(), TOL[torch.bfloat16])


def test_default_chunk_size():
    """Chunks of 2C rows: GPT-2's logits chunk is as large as its fp32 weight gradient."""
    assert default_chunk_rows(8192, 768) == 1536
    assert default_chunk_rows(100, 768) == 100 and default_chunk_rows(1, 1) == 1


def test_compiles_without_graph_break():
    hidden, weight, targets = make_case(10, 8, 40, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled = torch.compile(lambda a, b, t: linear_cross_entropy_triton(a, b, t), backend="aot_eager",
                             fullgraph=True)
    loss = compiled(h, w, targets)
    loss.backward()
    ref_loss, ref_h, ref_w = fp64_reference(hidden, weight, targets, "mean", torch.ones((), device=DEVICE))
    assert_close_scaled(loss, ref_loss, TOL[torch.float32])
    assert_close_scaled(h.grad, ref_h, TOL[torch.float32])
    assert_close_scaled(w.grad, ref_w, TOL[torch.float32])


@pytest.mark.parametrize("bad", ["shape", "dtype", "chunk", "vocab_size", "vocab_size_zero"])
def test_bad_input_raises_one_line_error(bad):
    hidden, weight, targets = make_case(5, 8, 10, torch.float32)
    kwargs = {}
    if bad == "shape":
        weight = weight[:, :4]
    elif bad == "dtype":
        weight = weight.double()
    elif bad == "chunk":
        kwargs["chunk_rows"] = 0
    else:
        kwargs["vocab_size"] = 11 if bad == "vocab_size" else 0  # more rows than the weight has; none
    with pytest.raises(FastGPTError, match="vocab_size" if bad.startswith("vocab_size") else None) as info:
        linear_cross_entropy_triton(hidden, weight, targets, IGNORE, "mean", **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [128, 100])  # a padded head (used as it is), and rows padded again per call
def test_vocab_size_scores_only_the_leading_rows(rows, dtype, reduction, monkeypatch):
    """With vocab_size=V only weight[:V] are tokens: the loss and gradients are those of the (N, V)
    logits, even with non-zero rows past V, and grad_weight keeps the weight's shape, 0 past V."""
    from fastgpt.kernels import linear_cross_entropy as lce
    copies = []
    real_pad = lce._padded_weight
    monkeypatch.setattr(lce, "_padded_weight", lambda w: copies.append(real_pad(w) is not w) or real_pad(w))
    V, N, C = 97, 21, 16
    hidden, weight, targets = make_case(N, C, rows, dtype, seed=3)
    targets = torch.where(targets == IGNORE, targets, targets % V)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy_triton(h, w, targets, IGNORE, reduction, chunk_rows=8, vocab_size=V)
    grad_out = torch.rand_like(loss) + 0.5
    grad_h, grad_w = torch.autograd.grad(loss, (h, w), grad_out)
    ref_loss, ref_h, ref_w = fp64_reference(hidden, weight[:V], targets, reduction, grad_out)
    assert grad_w.shape == weight.shape and grad_w.dtype == dtype
    assert_close_scaled(loss, ref_loss, TOL[dtype])
    assert_close_scaled(grad_h, ref_h, TOL[dtype])
    assert_close_scaled(grad_w[:V], ref_w, TOL[dtype])
    assert torch.equal(grad_w[V:], torch.zeros_like(grad_w[V:]))
    assert copies and all(copy == (rows % 64 != 0) for copy in copies)  # an aligned weight is never copied


def test_vocab_size_in_the_reference_and_the_dispatch_point():
    from fastgpt import ops
    from fastgpt.kernels.reference import linear_cross_entropy_reference
    hidden, weight, targets = make_case(9, 8, 64, torch.float32)
    targets = torch.where(targets == IGNORE, targets, targets % 50)
    ref_loss, _, _ = fp64_reference(hidden, weight[:50], targets, "mean", torch.ones((), device=DEVICE))
    assert_close_scaled(linear_cross_entropy_reference(hidden, weight, targets, IGNORE, vocab_size=50), ref_loss,
                        TOL[torch.float32])
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            got = ops.linear_cross_entropy(hidden, weight, targets, IGNORE, vocab_size=50)
        assert_close_scaled(got, ref_loss, TOL[torch.float32])
    with pytest.raises(FastGPTError, match="vocab_size"):
        linear_cross_entropy_reference(hidden, weight, targets, IGNORE, vocab_size=65)


@requires_gpu
def test_bf16_products_accumulate_straight_into_fp32_on_gpu():
    """cuBLAS adds each chunk's bf16 product into the fp32 grad_weight (no temporary)."""
    from fastgpt.kernels import linear_cross_entropy as lce
    hidden, weight, targets = make_case(64, 32, 1000, torch.bfloat16)
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy_triton(hidden, w, targets, IGNORE, "sum", chunk_rows=16)
    (grad_w,) = torch.autograd.grad(loss, w)
    assert lce._mixed_precision_addmm, "torch.addmm(out_dtype=float32) failed: the slower fallback ran"
    _, _, ref_w = fp64_reference(hidden, weight, targets, "sum", torch.ones((), device=DEVICE))
    assert_close_scaled(grad_w, ref_w, TOL[torch.bfloat16])


@requires_gpu
def test_peak_memory_at_least_4x_below_eager_on_gpu():
    """GPT-2 LM head, B*T = 8192, bf16: forward + backward peak memory, fused vs eager."""
    hidden, weight, targets = make_case(8192, 768, 50257, torch.bfloat16)
    h, w = hidden.requires_grad_(), weight.requires_grad_()

    def peak(step):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = torch.autograd.grad(step(), (h, w))
        torch.cuda.synchronize()
        del grads
        return torch.cuda.max_memory_allocated() - base

    eager = peak(lambda: F.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE))
    fused = peak(lambda: linear_cross_entropy_triton(h, w, targets, IGNORE))
    assert fused * 4 <= eager, f"fused peak {fused / 2**20:.0f} MiB vs eager {eager / 2**20:.0f} MiB"
