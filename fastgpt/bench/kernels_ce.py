"""Benchmark: cross-entropy and fused LM head + cross-entropy, Triton vs PyTorch.

For each op and shape, three backends on the same inputs in the same run:
  eager   - PyTorch as people write it: F.cross_entropy(logits) / F.cross_entropy(hidden @ W.T)
  compile - torch.compile of that same function (CUDA only: inductor's C++ build is
            minutes on a 2-core CPU)
  triton  - fastgpt's kernels (cross_entropy_triton / linear_cross_entropy_triton)
and four timings, median ms: eval (forward under no_grad), forward (inputs require grad:
a training forward, in which the fused op already computes its gradients), backward
(autograd.grad on the retained graph), full (forward + backward); plus cross-entropy
GB/s and the full step's peak CUDA memory. The goal at B*T = 8192, V = 50257, C = 768, bf16: the fused op at
least as fast as eager with at least 4x less peak memory.

    python3 -m fastgpt.bench.kernels_ce --device cuda --sizes gpt2 --out benchmarks/results/x
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime import dtype_name
from .common import (
    Row,
    markdown_table,
    measure_ms,
    peak_memory_mib,
    runnable_backends,
    start_suite,
    suite_main,
    write_results,
)

# (N, V) for cross-entropy; (N, C, V) for the fused op. dtype per size set.
SIZE_SETS = {
    "tiny": {"device": "any", "ce": [(16, 500)], "lce": [(16, 32, 500)], "dtypes": [torch.float32]},
    "gpt2": {"device": "cuda", "ce": [(8192, 50257)], "lce": [(8192, 768, 50257)],
             "dtypes": [torch.bfloat16]},
}
BACKENDS = ("eager", "compile", "triton")


def _eager_ce(logits, targets):
    return F.cross_entropy(logits, targets)


def _eager_lce(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets)


def _functions(op: str, backend: str):
    """The callable to time for (op, backend)."""
    from ..kernels.cross_entropy import cross_entropy_triton
    from ..kernels.linear_cross_entropy import linear_cross_entropy_triton
    eager = _eager_ce if op == "cross_entropy" else _eager_lce
    if backend == "eager":
        return eager
    if backend == "compile":
        return torch.compile(eager)
    return cross_entropy_triton if op == "cross_entropy" else linear_cross_entropy_triton


def _inputs(op: str, shape: tuple, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    if op == "cross_entropy":
        N, V = shape
        logits = torch.randn(N, V, generator=gen, device=device, dtype=torch.float32).mul_(2).to(dtype)
        return [logits.requires_grad_()], torch.randint(0, V, (N,), generator=gen, device=device)
    N, C, V = shape
    hidden = torch.randn(N, C, generator=gen, device=device, dtype=torch.float32).to(dtype)
    weight = torch.randn(V, C, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
    return [hidden.requires_grad_(), weight.requires_grad_()], torch.randint(0, V, (N,), generator=gen, device=device)


def _bench_one(op, backend, shape, dtype, device, warmup, repeats) -> list[Row]:
    fn = _functions(op, backend)
    tensors, targets = _inputs(op, shape, dtype, device)

    def evaluate():
        with torch.no_grad():
            return fn(*tensors, targets)

    def forward():
        return fn(*tensors, targets)

    def full():
        torch.autograd.grad(fn(*tensors, targets), tensors)

    retained_graph = [forward()]  # also compiles, for the compile backend
    try:
        torch.autograd.grad(retained_graph[0], tensors, retain_graph=True)
        retained = True
    except RuntimeError as err:  # a backend whose graph cannot be run twice: derive backward below
        print(f"kernels_ce: {op}/{backend}: backward on a retained graph failed ({str(err).splitlines()[0]}); "
              "reporting backward = full - forward")
        retained = False

    def backward():
        torch.autograd.grad(retained_graph[0], tensors, retain_graph=True)

    shape_text = "x".join(str(s) for s in shape)
    dtype_text = dtype_name(dtype)
    modes = [("eval", evaluate), ("forward", forward), ("full", full)] + ([("backward", backward)] if retained else [])
    rows, times = [], {}
    for mode, call in modes:
        med, p20, p80 = measure_ms(call, warmup=warmup, repeats=repeats, device=device)
        times[mode] = med
        rows.append(Row(f"{op}.{mode}", backend, shape_text, dtype_text, med, p20, p80, "ms"))
    if not retained:
        med = times["full"] - times["forward"]
        rows.append(Row(f"{op}.backward", backend, shape_text, dtype_text, med, med, med, "ms",
                        extra="derived=full-forward"))
    if op == "cross_entropy":
        # Bytes the logits pass must move: eval reads the logits once; a full step reads them
        # twice and writes their gradient once (eager also writes and reads a log-softmax).
        N, V = shape
        nbytes = N * V * tensors[0].element_size()
        for mode, passes in (("eval", 1), ("full", 3)):
            gbps = passes * nbytes / (times[mode] * 1e-3) / 1e9
            rows.append(Row(f"{op}.{mode}.bandwidth", backend, shape_text, dtype_text, gbps, gbps, gbps, "GB/s",
                            extra=f"bytes={passes * nbytes}"))
    retained_graph.clear()  # drop it before the memory measurement
    peak = peak_memory_mib(full, device)
    if peak is not None:
        rows.append(Row(f"{op}.full.peak_memory", backend, shape_text, dtype_text, peak, peak, peak, "MiB",
                        extra="allocated during forward+backward, inputs excluded"))
    return rows


def run(device: str = "cuda", sizes: str = "gpt2", out_dir: str | Path | None = None,
        backends: tuple[str, ...] = BACKENDS) -> list[Row]:
    """Benchmark both ops at the named size set; write kernels_ce.csv / kernels_ce.md into out_dir."""
    on_cuda = start_suite("kernels_ce", device, sizes, SIZE_SETS, backends, BACKENDS)
    if on_cuda is None:
        return []
    spec = SIZE_SETS[sizes]
    backends = runnable_backends("kernels_ce", backends, on_cuda)
    warmup, repeats = (10, 50) if on_cuda else (0, 2)

    rows: list[Row] = []
    for dtype in spec["dtypes"]:
        for op, shapes in (("cross_entropy", spec["ce"]), ("linear_cross_entropy", spec["lce"])):
            for shape in shapes:
                for backend in backends:
                    rows.extend(_bench_one(op, backend, shape, dtype, device, warmup, repeats))
                    if on_cuda:
                        torch.cuda.empty_cache()
    if out_dir is not None and rows:
        _write(rows, Path(out_dir))
    return rows


def _write(rows: list[Row], out_dir: Path) -> None:
    write_results(rows, out_dir, "kernels_ce", "# Cross-entropy kernels\n\n" + markdown_table(rows, baseline="eager"))


def main(argv: list[str] | None = None) -> int:
    return suite_main(argv, "kernels_ce", __doc__, SIZE_SETS, run, "eager")

if __name__ == "__main__":
    raise SystemExit(main())
