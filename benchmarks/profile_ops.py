"""Where an op's time goes on a GPU: device time of its kernels vs. host time per call.

do_bench (what `fastgpt bench` reports) times one call between two CUDA events, so a
call whose host side (Python, dispatch, launch) is slower than its kernels shows the
host time. This script separates the two for every fastgpt op at GPT-2 shapes:

  graph_ms   the op replayed from a CUDA graph (no host work at all: kernel time)
  host_us    host time per call when calls are queued back to back (no sync inside)
  kernels    the CUDA kernels one call launches, from torch.profiler, with their times

    python3 benchmarks/profile_ops.py [WORD ...]             # cases whose name has a WORD
    python3 benchmarks/profile_ops.py --host-profile WORD ...  # + cProfile of the host side
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def host_us(fn, calls: int = 200) -> float:
    """Host time per call: launch `calls` calls back to back, sync once."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def graph_ms(fn) -> float | str:
    from triton.testing import do_bench_cudagraph
    try:
        return do_bench_cudagraph(fn, rep=50)
    except Exception as err:  # an op that syncs with the host cannot be captured
        return f"no graph ({type(err).__name__}: {str(err).splitlines()[0][:60]})"


def kernel_table(fn) -> str:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    lines = []
    for evt in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]:
        lines.append(f"      {evt.device_time_total:9.1f} us  x{evt.count:<3d} {evt.key[:90]}")
    return "\n".join(lines)


def host_profile(fn, calls: int = 300) -> str:
    """The Python functions a call spends its host time in (cProfile, cumulative)."""
    import cProfile
    import io
    import pstats
    fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_ops: needs a CUDA GPU", file=sys.stderr)
        return 1
    from fastgpt.kernels.attention import attention_triton
    from fastgpt.kernels.cross_entropy import cross_entropy_triton
    from fastgpt.kernels.gelu import bias_gelu_triton
    from fastgpt.kernels.layernorm import add_layer_norm_triton, layer_norm_triton
    from fastgpt.kernels.linear_cross_entropy import linear_cross_entropy_triton

    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    N, C, V = 8192, 768, 50257
    x = torch.randn(N, C, device=dev, dtype=bf16, requires_grad=True)
    r = torch.randn(N, C, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(C, device=dev, dtype=bf16, requires_grad=True)
    b = torch.zeros(C, device=dev, dtype=bf16, requires_grad=True)
    h = torch.randn(N, 4 * C, device=dev, dtype=bf16, requires_grad=True)
    hb = torch.zeros(4 * C, device=dev, dtype=bf16, requires_grad=True)
    logits = torch.randn(N, V, device=dev, dtype=bf16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=dev)
    head = (0.02 * torch.randn(V, C, device=dev)).to(bf16).requires_grad_()
    q, k, v = (torch.randn(8, 12, 1024, 64, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))

    def fwd_bwd(f):
        def run():
            out = f()
            out = out[1] if isinstance(out, tuple) else out
            out.float().sum().backward() if out.dim() else out.backward()
        return run

    cases = {
        "layer_norm fwd eager": lambda: F.layer_norm(x, (C,), w, b),
        "layer_norm fwd triton": lambda: layer_norm_triton(x, w, b),
        "layer_norm fwd+bwd eager": fwd_bwd(lambda: F.layer_norm(x, (C,), w, b)),
        "layer_norm fwd+bwd triton": fwd_bwd(lambda: layer_norm_triton(x, w, b)),
        "add_layer_norm fwd triton": lambda: add_layer_norm_triton(r, x, w, b),
        "bias_gelu fwd eager": lambda: F.gelu(h + hb, approximate="tanh"),
        "bias_gelu fwd triton": lambda: bias_gelu_triton(h, hb),
        "bias_gelu fwd+bwd eager": fwd_bwd(lambda: F.gelu(h + hb, approximate="tanh")),
        "bias_gelu fwd+bwd triton": fwd_bwd(lambda: bias_gelu_triton(h, hb)),
        "cross_entropy fwd+bwd eager": fwd_bwd(lambda: F.cross_entropy(logits, targets)),
        "cross_entropy fwd+bwd triton": fwd_bwd(lambda: cross_entropy_triton(logits, targets)),
        "linear_ce fwd+bwd eager": fwd_bwd(lambda: F.cross_entropy(x @ head.t(), targets)),
        "linear_ce fwd+bwd triton": fwd_bwd(lambda: linear_cross_entropy_triton(x, head, targets)),
        "attention fwd+bwd sdpa": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "attention fwd+bwd triton": fwd_bwd(lambda: attention_triton(q, k, v)),
    }
    args = sys.argv[1:]
    cprofile = "--host-profile" in args
    only = [a for a in args if a != "--host-profile"]
    for name, fn in cases.items():
        if only and not any(word in name for word in only):
            continue
        host = host_us(fn)
        graph = graph_ms(fn)
        graph_text = f"{graph * 1e3:8.1f} us" if isinstance(graph, float) else graph
        print(f"{name:32s} host {host:8.1f} us/call   graph {graph_text}", flush=True)
        print(kernel_table(fn), flush=True)
        if cprofile:
            print(host_profile(fn), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
