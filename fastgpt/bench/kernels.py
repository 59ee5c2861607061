"""Benchmark: the memory-bound kernels (LayerNorm, residual add + LayerNorm, bias + GELU).

For each kernel case, three backends on the same inputs in the same run:
  eager   - PyTorch as people write it (F.layer_norm, r = res + x then F.layer_norm,
            F.gelu(x + b, approximate="tanh"));
  compile - torch.compile of that same function (CUDA only: inductor's C++ build takes
            minutes on a small CPU);
  triton  - fastgpt's kernels.
and three timings, median ms: forward (inputs require grad), backward (autograd.grad on
a retained graph) and full (forward + backward); plus achieved GB/s = the bytes the op
must move at least (each input read once, each output written once) / time, set against
the card's peak bandwidth where known, and the full step's peak CUDA memory.

These ops do a few flops per byte, so GB/s is their figure of merit: a good kernel
runs near the card's bandwidth. GPT-2 shapes: B*T = 8 * 1024 = 8192 rows; C = 768
for the norms and 4C = 3072 for GELU; bf16.

Other kernel benchmarks join this one by appending a KernelCase to KERNEL_CASES, or,
like the cross-entropy benchmark (fastgpt.bench.kernels_ce), through their own
`run(device, sizes, out_dir)`, which `run` here calls when that module is present.

    python3 -m fastgpt.bench.kernels --device cuda --sizes gpt2 --out benchmarks/results/kernels
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..runtime import dtype_name
from .common import (
    Row,
    device_name,
    markdown_table,
    measure_ms,
    peak_memory_mib,
    runnable_backends,
    start_suite,
    suite_main,
    write_results,
)

BACKENDS = ("eager", "compile", "triton")
SIZE_SETS = {  # rows, and the dtype the set runs in
    "tiny": {"rows": 16, "dtype": torch.float32, "device": "any"},
    "gpt2": {"rows": 8 * 1024, "dtype": torch.bfloat16, "device": "cuda"},
}
# Peak DRAM bandwidth, GB/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_GBPS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2000.0)]


@dataclass
class KernelCase:
    """One op to benchmark. `inputs(rows, dtype, device)` returns the tensors the functions take
    (all requiring grad); `min_bytes(mode, tensors)` is the traffic an ideal kernel needs."""
    name: str
    width: dict[str, int]  # size set -> feature width
    eager: Callable
    triton: Callable
    inputs: Callable
    min_bytes: Callable


def _activation_and_params(rows, width, dtype, device, n_activations=1):
    gen = torch.Generator(device=device).manual_seed(0)
    acts = [torch.randn(rows, width, generator=gen, device=device).to(dtype).requires_grad_()
            for _ in range(n_activations)]
    weight = (1 + 0.1 * torch.randn(width, generator=gen, device=device)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(width, generator=gen, device=device)).to(dtype).requires_grad_()
    return acts, weight, bias


def _layer_norm_case() -> KernelCase:
    from ..kernels.layernorm import layer_norm_triton

    def inputs(rows, width, dtype, device):
        (x,), w, b = _activation_and_params(rows, width, dtype, device)
        return [x, w, b]

    def min_bytes(mode, t):
        act = t[0].numel() * t[0].element_size()
        return {"forward": 2 * act, "backward": 3 * act, "full": 5 * act}[mode]  # x,y | x,dy,dx

    return KernelCase("layer_norm", {"tiny": 64, "gpt2": 768},
                      lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
                      lambda x, w, b: layer_norm_triton(x, w, b, 1e-5), inputs, min_bytes)


def _add_layer_norm_case() -> KernelCase:
    from ..kernels.layernorm import add_layer_norm_triton

    def eager(residual, x, w, b):
        new_residual = residual + x
        return new_residual, F.layer_norm(new_residual, (x.shape[-1],), w, b, 1e-5)

    def inputs(rows, width, dtype, device):
        (residual, x), w, b = _activation_and_params(rows, width, dtype, device, n_activations=2)
        return [residual, x, w, b]

    def min_bytes(mode, t):
        act = t[0].numel() * t[0].element_size()
        # forward: residual, x in; new residual, y out. backward: new residual, dy, d(new residual)
        # in; one gradient out (residual and x receive the same one).
        return {"forward": 4 * act, "backward": 4 * act, "full": 8 * act}[mode]

    return KernelCase("add_layer_norm", {"tiny": 64, "gpt2": 768}, eager,
                      lambda residual, x, w, b: add_layer_norm_triton(residual, x, w, b, 1e-5), inputs, min_bytes)


def _bias_gelu_case() -> KernelCase:
    from ..kernels.gelu import bias_gelu_triton

    def inputs(rows, width, dtype, device):
        (x,), _w, b = _activation_and_params(rows, width, dtype, device)
        return [x, b]

    def min_bytes(mode, t):
        act = t[0].numel() * t[0].element_size()
        return {"forward": 2 * act, "backward": 3 * act, "full": 5 * act}[mode]  # x,y | x,dy,dx

    return KernelCase("bias_gelu", {"tiny": 256, "gpt2": 3072},
                      lambda x, b: F.gelu(x + b, approximate="tanh"), bias_gelu_triton, inputs, min_bytes)


KERNEL_CASES: list[Callable[[], KernelCase]] = [_layer_norm_case, _add_layer_norm_case, _bias_gelu_case]


def peak_bandwidth_gbps(device: str) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    name = device_name(device)
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def _outputs(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _bench_case(case: KernelCase, backend: str, sizes: str, device: str, warmup: int, repeats: int) -> list[Row]:
    spec = SIZE_SETS[sizes]
    rows_n, width, dtype = spec["rows"], case.width[sizes], spec["dtype"]
    fn = torch.compile(case.eager) if backend == "compile" else case.triton if backend == "triton" else case.eager
    tensors = case.inputs(rows_n, width, dtype, device)
    outs = _outputs(fn(*tensors))  # also compiles, for the compile backend
    grads = [torch.randn_like(o) for o in outs]

    def forward():
        return fn(*tensors)

    def backward():
        torch.autograd.grad(outs, tensors, grads, retain_graph=True)

    def full():
        torch.autograd.grad(_outputs(fn(*tensors)), tensors, grads)

    shape = f"{rows_n}x{width}"
    dtype_text = dtype_name(dtype)
    peak_bw = peak_bandwidth_gbps(device)
    result = []
    for mode, call in (("forward", forward), ("backward", backward), ("full", full)):
        med, p20, p80 = measure_ms(call, warmup=warmup, repeats=repeats, device=device)
        result.append(Row(f"{case.name}.{mode}", backend, shape, dtype_text, med, p20, p80, "ms"))
        nbytes = case.min_bytes(mode, tensors)
        gbps = nbytes / (med * 1e-3) / 1e9
        extra = f"bytes={nbytes}" + (f";peak_GBps={peak_bw:.0f};pct_of_peak={100 * gbps / peak_bw:.1f}"
                                     if peak_bw else "")
        result.append(Row(f"{case.name}.{mode}.bandwidth", backend, shape, dtype_text, gbps,
                          nbytes / (p80 * 1e-3) / 1e9, nbytes / (p20 * 1e-3) / 1e9, "GB/s", extra=extra))
    outs.clear()  # drop the retained graph before the memory measurement
    peak = peak_memory_mib(full, device)
    if peak is not None:
        result.append(Row(f"{case.name}.full.peak_memory", backend, shape, dtype_text, peak, peak, peak, "MiB",
                          extra="allocated during forward+backward, inputs excluded"))
    return result


def run(device: str = "cuda", sizes: str = "gpt2", out_dir: str | Path | None = None,
        backends: tuple[str, ...] = BACKENDS, include_others: bool = True) -> list[Row]:
    """Benchmark every KERNEL_CASES entry (then, if present, fastgpt.bench.kernels_ce) at the
    named size set; write kernels.csv / kernels.md into out_dir. GPU-only size sets are
    skipped with a message on CPU, as are compile (CPU) and triton (CPU without TRITON_INTERPRET=1)."""
    requested = tuple(backends)
    on_cuda = start_suite("kernels", device, sizes, SIZE_SETS, requested, BACKENDS)
    rows: list[Row] = []
    if on_cuda is not None:
        backends = runnable_backends("kernels", requested, on_cuda)
        warmup, repeats = (10, 50) if on_cuda else (1, 3)
        for make_case in KERNEL_CASES:
            case = make_case()
            for backend in backends:
                rows.extend(_bench_case(case, backend, sizes, device, warmup, repeats))
                if on_cuda:
                    torch.cuda.empty_cache()
    if include_others:
        try:
            other = importlib.import_module(".kernels_ce", __package__)
        except ImportError:
            other = None
        if other is not None:
            rows.extend(other.run(device, sizes, out_dir, requested))
    if out_dir is not None and rows:
        _write(rows, Path(out_dir))
    return rows


def _write(rows: list[Row], out_dir: Path) -> None:
    write_results(rows, out_dir, "kernels", "# Kernel benchmarks\n\n" + markdown_table(rows, baseline="eager"))


def main(argv: list[str] | None = None) -> int:
    def add(parser):
        parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
        parser.add_argument("--no-others", action="store_true", help="skip the cross-entropy benchmark")
    return suite_main(argv, "kernels", __doc__, SIZE_SETS, run, "eager", add,
                      lambda args: {"backends": tuple(args.backends), "include_others": not args.no_others})

if __name__ == "__main__":
    raise SystemExit(main())
