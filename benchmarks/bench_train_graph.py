"""The training step eager and recorded as one CUDA graph, on the same model in the same run.

    python3 benchmarks/bench_train_graph.py --device cuda --sizes gpt2 --out benchmarks/results/DIR
    python3 benchmarks/bench_train_graph.py --device cpu --sizes tiny      # dry run: eager only

GPT-2 124M at T=1024, B=8 and B=32, bf16 autocast, fastgpt's kernels, fused AdamW, clipping:
milliseconds per step (median, p20, p80 of samples of several steps), tokens/s and the
graph/eager ratio, printed and written to OUT/train_graph.md. The losses of steps 4-6 (the
graph's first replays) are printed too: equal to eager's when the graph replays the eager step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastgpt.bench.common import free_memory, measure_steps_ms  # noqa: E402
from fastgpt.config import preset  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from fastgpt.runtime import autocast_factory, describe_machine, resolve_dtype  # noqa: E402
from fastgpt.train.cuda_graph import GraphedTrainStep, off_reason  # noqa: E402
from fastgpt.train.optim import make_optimizer  # noqa: E402
from fastgpt.train.step import train_step  # noqa: E402

SIZES = {"gpt2": ("gpt2", 1024, (8, 32), 5), "tiny": ("tiny", 64, (2,), 2)}  # preset, T, batches, samples


def _contender(variant: str, config, batch: int, device: torch.device, autocast):
    """(a zero-argument step, the losses of its steps 4-6: the graph's first replays after 3 eager steps)."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, 6e-4, 0.1, (0.9, 0.95), 1e-8, device)
    parameters = list(model.parameters())
    generator = torch.Generator().manual_seed(1)
    micro = [(torch.randint(0, config.vocab_size, (batch, config.context_length), generator=generator),
              torch.randint(0, config.vocab_size, (batch, config.context_length), generator=generator))]

    def loss_fn(b):
        return model(b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True))
    if variant == "graph":
        graphed = GraphedTrainStep(loss_fn, optimizer, parameters, grad_clip=1.0, autocast=autocast)

        def step():
            return graphed(micro, 6e-4)
    else:
        def step():
            return train_step(loss_fn, micro, optimizer, parameters, lr=6e-4, grad_clip=1.0, autocast=autocast)
    first = [step().loss for _ in range(6)][3:]
    return step, [round(float(loss), 6) for loss in first]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="gpt2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--samples", type=int, default=None, help="default: 5 (gpt2), 2 (tiny)")
    parser.add_argument("--steps-per-sample", type=int, default=None, help="default: as --samples")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device, "train")
    autocast = autocast_factory(device, dtype)
    name, context, batches, samples = SIZES[args.sizes]
    samples, per_sample = args.samples or samples, args.steps_per_sample or samples
    config = preset(name, context_length=context)
    variants = ["eager"] + (["graph"] if off_reason(device) is None else [])
    lines = [f"# training step: eager vs one CUDA graph ({describe_machine(device)}, {dtype}, {name}, T={context})",
             "", "| batch | variant | ms/step median (p20-p80) | tokens/s | vs eager | losses of steps 4-6 |",
             "| ---: | --- | ---: | ---: | ---: | --- |"]
    if len(variants) == 1:
        print(f"graph: not measured ({off_reason(device)})")
    for batch in batches:
        eager_ms = None
        for variant in variants:
            step, first = _contender(variant, config, batch, device, autocast)
            median, p20, p80 = measure_steps_ms(step, per_sample, samples, warmup=2,
                                                device=str(device))
            eager_ms = eager_ms or median
            row = (f"| {batch} | {variant} | {median:.1f} ({p20:.1f}-{p80:.1f}) | "
                   f"{batch * context / median * 1e3:,.0f} | {eager_ms / median:.2f}x | {first} |")
            print(row, flush=True)
            lines.append(row)
            del step
            free_memory(str(device))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_graph.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
