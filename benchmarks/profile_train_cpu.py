"""Where fastgpt's CPU training step loses time against the nanoGPT-style contender.

Two views, same model and batch as `fastgpt bench train --sizes cpu` (GPT-2 124M, B=4, T=256, fp32):
  1. torch.profiler over one training step of each contender: the aten ops by self CPU time;
  2. each hot op alone at the step's shapes, forward + backward: fastgpt's CPU path
     (ops.* under backend "torch") against the PyTorch call the contender makes, in the
     same process, interleaved, median of several runs.

    python3 benchmarks/profile_train_cpu.py [--layers 12 --width 768 --batch 4 --context 256] [--ops-only]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from fastgpt import ops  # noqa: E402
from fastgpt.bench.nanogpt import make_optimizer as nanogpt_optimizer  # noqa: E402
from fastgpt.bench.nanogpt import padded_vocab  # noqa: E402
from fastgpt.bench.train import TrainStep  # noqa: E402
from fastgpt.config import preset  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from fastgpt.train.optim import make_optimizer  # noqa: E402


def profile_step(variant: str, cfg, batch: int, rows: int) -> str:
    """The aten ops of one steady-state training step, by self CPU time."""
    step = TrainStep(variant, cfg, batch, "cpu", torch.float32)
    step()  # optimizer state allocated
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"== {variant}: one step, {wall:.2f} s under the profiler\n{table}"


def _fwd_bwd(fn, tensors, others=()):
    def run():
        out = fn(*tensors, *others)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        torch.autograd.grad(outs, tensors, [torch.ones_like(o) for o in outs])
    return run


def _optimizer_pair(cfg):
    """One AdamW step over the whole model's parameters: fastgpt's (fused on CPU) vs nanoGPT's (foreach)."""
    def prepared(model, optimizer):
        for p in model.parameters():
            p.grad = torch.randn_like(p)

        def run():
            optimizer.step()
        return run
    ours, theirs = GPT(cfg), GPT(cfg)
    return (prepared(ours, make_optimizer(ours, 6e-4, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))),
            prepared(theirs, nanogpt_optimizer(theirs)))


def op_pairs(cfg, batch: int):
    """(op, fastgpt's CPU call, the contender's call) at the training step's shapes."""
    B, T, C, H = batch, cfg.context_length, cfg.n_embd, cfg.n_head
    D, V, N = C // H, cfg.vocab_size, batch * cfg.context_length

    def grad(*shape):
        return torch.randn(*shape).requires_grad_()

    x, w, b = grad(B, T, C), grad(C), grad(C)
    residual = grad(B, T, C)
    pre, fc_bias = grad(B, T, 4 * C), grad(4 * C)
    q, k, v = (grad(B, H, T, D) for _ in range(3))
    hidden, head = grad(N, C), torch.randn(V, C).mul_(0.02).requires_grad_()
    head_padded = torch.randn(padded_vocab(V), C).mul_(0.02).requires_grad_()
    targets = torch.randint(0, V, (N,))

    def torch_backend(fn):
        def call(*args):
            with ops.use_backend("torch"):
                return fn(*args)
        return call

    return [
        ("adamw step (all parameters)", *_optimizer_pair(cfg)),
        ("attention", _fwd_bwd(torch_backend(ops.attention), [q, k, v]),
         _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])),
        ("bias_gelu", _fwd_bwd(torch_backend(ops.bias_gelu), [pre, fc_bias]),
         _fwd_bwd(lambda x, b: F.gelu(x + b, approximate="tanh"), [pre, fc_bias])),
        ("layer_norm", _fwd_bwd(torch_backend(ops.layer_norm), [x, w, b]),
         _fwd_bwd(lambda x, w, b: F.layer_norm(x, (C,), w, b, 1e-5), [x, w, b])),
        ("add_layer_norm", _fwd_bwd(torch_backend(ops.add_layer_norm), [residual, x, w, b]),
         _fwd_bwd(lambda r, x, w, b: (r + x, F.layer_norm(r + x, (C,), w, b, 1e-5)), [residual, x, w, b])),
        ("lm_head+cross_entropy", _fwd_bwd(torch_backend(ops.linear_cross_entropy), [hidden, head], (targets,)),
         _fwd_bwd(lambda h, w, t: F.cross_entropy(h @ w.t(), t), [hidden, head_padded], (targets,))),
    ]


def time_pairs(pairs, repeats: int) -> str:
    """Median ms of each side, runs interleaved so a shared machine's load hits both alike."""
    lines = ["| op (fwd+bwd) | fastgpt CPU path ms | contender ms | fastgpt speed-up |",
             "| --- | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    for name, ours, theirs in pairs:
        ours(), theirs()  # warm up
        times = {"ours": [], "theirs": []}
        for _ in range(repeats):
            for side, fn in (("ours", ours), ("theirs", theirs)):
                start = time.perf_counter()
                fn()
                times[side].append((time.perf_counter() - start) * 1e3)
        a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=None, help="default: width / 64")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25, help="profiler rows per contender")
    parser.add_argument("--ops-only", action="store_true", help="skip the whole-step profiles")
    args = parser.parse_args(argv)
    cfg = preset("gpt2", n_layer=args.layers, n_embd=args.width, n_head=args.heads or args.width // 64,
                 context_length=args.context)
    print(f"# CPU step profile: L{cfg.n_layer}-C{cfg.n_embd}, B={args.batch}, T={cfg.context_length}, fp32, "
          f"{torch.get_num_threads()} threads\n", flush=True)
    time_pairs(op_pairs(cfg, args.batch), args.repeats)  # prints its table row by row
    if not args.ops_only:
        for variant in ("fastgpt", "nanogpt"):
            print(profile_step(variant, cfg, args.batch, args.rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
