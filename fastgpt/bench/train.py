"""Benchmark: one full training step of a whole GPT against what a user would otherwise run.

A step = forward + backward + gradient clipping at norm 1 + AdamW, on a fixed batch.
Contenders, on the same shapes in the same run:
  fastgpt          - fastgpt's GPT as `fastgpt pretrain` runs it: backend "auto" (the
                     Triton kernels on CUDA; on CPU the ops' PyTorch paths), its fused AdamW;
  fastgpt+compile  - the same under torch.compile (`fastgpt pretrain --compile`);
  nanogpt          - THE BASELINE: the nanoGPT / llm.c-PyTorch recipe (fastgpt/bench/nanogpt.py):
                     SDPA flash attention, tanh GELU, vocabulary padded to 50304, fused AdamW,
                     whole-model torch.compile on CUDA (eager on a CPU, as nanoGPT's CPU
                     runs are), TF32 on, bf16 autocast on CUDA;
  nanogpt+compile  - the same with torch.compile on any device (part of the cpu size set,
                     with fastgpt+compile: compile helped both on a CPU here);
  nanogpt-eager    - the same without torch.compile on any device;
  textbook         - second baseline: fastgpt's own textbook reference (backend "torch":
                     T x T attention scores, written-out GELU, unpadded 50257-wide head);
                     on CPU it is the same code as `fastgpt` and is skipped;
  textbook+compile - that reference under torch.compile (CUDA; on request).
Ratios are against nanogpt. Timing: samples of several steps each (so p20/p80 describe
steps, not single stalls); on a CPU the samples are interleaved across contenders so a
shared machine's load changes hit all of them alike; on a GPU each contender runs alone.
Reported per batch size: tokens/s (MFU in `extra`, FLOPs per token 6N + 12*L*H*Q*T of
the unpadded model, see fastgpt.train.mfu), and on CUDA the peak memory of a steady-state
step (weights, gradients and optimizer state included) and the largest batch that fits
(doubling, then bisection; one step per probe).

Size sets:
  gpt2       (CUDA, bf16 autocast): GPT-2 124M, T=1024, B=8 and B=32;
  cpu        (CPU, fp32): GPT-2 124M at B=4, T=256, and 6 layers x 384 at B=4, T=256;
  tiny       (any device, fp32): a 2-layer model, seconds on a CPU (CI).

    python3 -m fastgpt.bench.train --device cuda --sizes gpt2 --out benchmarks/results/train
    python3 -m fastgpt.bench.train --device cpu --sizes cpu --variants fastgpt,nanogpt   # without compile
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops
from ..config import GPTConfig, preset
from ..model import GPT
from ..runtime import dtype_name
from ..train.mfu import model_flops_per_token, peak_flops
from ..train.optim import make_optimizer
from .common import (
    Row,
    cuda_peak_mib,
    device_name,
    free_memory,
    markdown_table,
    measure_steps_ms,
    quantiles,
    start_suite,
    suite_main,
    write_results,
)
from .nanogpt import NanoGPT
from .nanogpt import make_optimizer as nanogpt_optimizer

VARIANTS = ("fastgpt", "fastgpt+compile", "nanogpt", "nanogpt+compile", "nanogpt-eager", "textbook", "textbook+compile")
DEFAULT_VARIANTS = ("fastgpt", "nanogpt", "textbook")
BASELINE = "nanogpt"


@dataclass(frozen=True)
class Case:
    """One model shape and the batch sizes it is timed at."""
    model: str
    overrides: dict
    batches: tuple[int, ...]

    def config(self) -> GPTConfig:
        return preset(self.model, **self.overrides)


SIZE_SETS = {
    "gpt2": dict(device="cuda", cases=(Case("gpt2", {}, (8, 32)),), dtype=torch.bfloat16,
                 warmup=3, samples=10, steps=5, memory=True),
    # Both ways, eager and compiled: inductor made the recipe 1.13-1.18x faster on the 2-core
    # EPYC, and fastgpt 0.94-1.11x (benchmarks/results/2026-11-30-cpu-train).
    "cpu": dict(device="cpu", cases=(Case("gpt2", dict(context_length=256), (4,)),
                                     Case("gpt2", dict(n_layer=6, n_head=6, n_embd=384, context_length=256), (4,))),
                dtype=torch.float32, warmup=1, samples=3, steps=2, memory=False,
                variants=("fastgpt", "fastgpt+compile", "nanogpt", "nanogpt+compile")),
    "tiny": dict(device="any", cases=(Case("tiny", dict(context_length=32), (2,)),), dtype=torch.float32,
                 warmup=1, samples=3, steps=2, memory=False),
}


def _skip_reason(variant: str, on_cuda: bool) -> str | None:
    """Why `variant` is not run on this device (None if it is)."""
    if not on_cuda and variant == "textbook":
        return "on CPU fastgpt runs the same PyTorch reference; the fastgpt row is it"
    if not on_cuda and variant == "textbook+compile":
        return "the compiled textbook reference is a CUDA comparison"
    return None


def _compiles(variant: str, on_cuda: bool) -> bool:
    return variant.endswith("+compile") or (variant == "nanogpt" and on_cuda)


class TrainStep:
    """One contender's model + optimizer + a fixed random batch; calling it runs one step."""

    def __init__(self, variant: str, cfg: GPTConfig, batch: int, device: str, dtype: torch.dtype):
        self.variant, self.cfg, self.device = variant, cfg, device
        on_cuda = str(device).startswith("cuda")
        torch.manual_seed(0)
        if variant.startswith("nanogpt"):
            self.model = NanoGPT(cfg).to(device)
            self.optimizer = nanogpt_optimizer(self.model)
            self.backend = None
        else:
            self.model = GPT(cfg).to(device)
            self.optimizer = make_optimizer(self.model, 6e-4, 0.1, (0.9, 0.95), 1e-8, torch.device(device))
            self.backend = "auto" if variant.startswith("fastgpt") else "torch"
        self.forward = torch.compile(self.model) if _compiles(variant, on_cuda) else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.device_type, self.dtype = torch.device(device).type, dtype
        self.set_batch(batch)

    def set_batch(self, batch: int) -> None:
        gen = torch.Generator().manual_seed(batch)
        shape = (batch, self.cfg.context_length)
        self.batch = batch
        self.x = torch.randint(0, self.cfg.vocab_size, shape, generator=gen).to(self.device)
        self.y = torch.randint(0, self.cfg.vocab_size, shape, generator=gen).to(self.device)

    def _context(self):
        stack = contextlib.ExitStack()
        if self.backend is not None:
            stack.enter_context(ops.use_backend(self.backend))
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type=self.device_type, dtype=self.dtype))
        return stack

    def __call__(self) -> torch.Tensor:
        with self._context():
            loss = self.forward(self.x, self.y)
        with ops.use_backend(self.backend) if self.backend else contextlib.nullcontext():
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def flops_per_token(cfg: GPTConfig) -> int:
    """Model FLOPs per trained token of fastgpt's (unpadded) GPT for `cfg`: every contender
    is credited with the same work, so MFU ratios equal tokens/s ratios."""
    with torch.device("meta"):
        return model_flops_per_token(GPT(cfg), cfg.context_length)


def _model_name(cfg: GPTConfig) -> str:
    return f"L{cfg.n_layer}-C{cfg.n_embd}"


def _throughput_rows(steps: dict[str, TrainStep], cfg, batch, device, dtype, spec) -> list[Row]:
    """Tokens/s of every contender at `batch`, samples interleaved across contenders."""
    for step in steps.values():
        step.set_batch(batch)
        measure_steps_ms(step, 1, 1, warmup=spec["warmup"], device=device)  # compiles / allocates
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for sample in range(spec["samples"]):
        # the order rotates each round, so that no contender always runs after the same one
        for name in order[sample % len(order):] + order[:sample % len(order)]:
            times[name].append(measure_steps_ms(steps[name], spec["steps"], 1, warmup=0, device=device)[0])
    tokens = batch * cfg.context_length
    per_token = flops_per_token(cfg)
    peak = peak_flops(torch.device(device), dtype)
    rows = []
    for name, samples in times.items():
        med, p20, p80 = quantiles(samples)
        mfu = f"{100 * tokens / (med / 1e3) * per_token / peak:.1f}%" if peak else "n/a"
        extra = (f"ms={med:.2f};mfu={mfu};flops_per_token={per_token};steps_per_sample={spec['steps']};"
                 f"samples={spec['samples']};compiled={_compiles(name, str(device).startswith('cuda'))}")
        rows.append(Row(name="train_step", backend=name, shape=f"{_model_name(cfg)} B={batch} T={cfg.context_length}",
                        dtype=dtype_name(dtype), median=tokens / (med / 1e3), p20=tokens / (p80 / 1e3),
                        p80=tokens / (p20 / 1e3), unit="tokens/s", device=device_name(device), extra=extra))
    return rows


def _peak_memory_row(step: TrainStep, cfg, device, dtype) -> Row:
    """Total peak CUDA memory of one steady-state step (run with this contender alone on the GPU)."""
    mib = cuda_peak_mib(step, device)
    return Row(name="train_step_peak_memory", backend=step.variant,
               shape=f"{_model_name(cfg)} B={step.batch} T={cfg.context_length}", dtype=dtype_name(dtype),
               median=mib, p20=mib, p80=mib, unit="MiB", device=device_name(device),
               extra="max_memory_allocated: weights, gradients, optimizer state and activations")


def _fits(step: TrainStep, batch: int) -> bool:
    try:
        step.set_batch(batch)
        step()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        step.optimizer.zero_grad(set_to_none=True)
        return False
    finally:
        free_memory(step.device)


def largest_fitting(fits, limit: int) -> int:
    """Largest b in 1..limit with fits(b) (0 if none), fits being monotone: doubling, then bisection."""
    good, b = 0, 1
    while b <= limit and fits(b):
        good, b = b, b * 2
    bad = b if b <= limit else limit + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _largest_batch_row(step: TrainStep, cfg, device, dtype, limit: int = 1024) -> Row:
    """The largest batch whose training step fits in memory (one step per probe)."""
    good = largest_fitting(lambda b: _fits(step, b), limit)
    return Row(name="train_largest_batch", backend=step.variant, shape=f"{_model_name(cfg)} T={cfg.context_length}",
               dtype=dtype_name(dtype), median=good, p20=good, p80=good, unit="sequences",
               device=device_name(device), extra=f"limit={limit}")


def _measure_group(group: list[str], cfg, batches, device, dtype, spec, on_cuda: bool) -> list[Row]:
    """Throughput of the contenders in `group` at each batch (interleaved), then on CUDA each
    one's peak memory at each batch and its largest batch. A batch that does not fit is
    reported as such and skipped."""
    rows: list[Row] = []
    steps = {v: TrainStep(v, cfg, batches[0], device, dtype) for v in group}
    for batch in batches:
        new = None
        try:
            new = _throughput_rows(steps, cfg, batch, device, dtype, spec)
            if spec["memory"] and on_cuda:
                new += [_peak_memory_row(step, cfg, device, dtype) for step in steps.values()]
        except torch.cuda.OutOfMemoryError:
            print(f"train: {', '.join(group)} at B={batch}: out of memory; no rows", flush=True)
        if new is None:  # outside the except block: its traceback no longer holds the step's tensors
            for step in steps.values():
                step.optimizer.zero_grad(set_to_none=True)
            free_memory(device)
            continue
        for row in new:
            _print(row)
        rows += new
    if spec["memory"] and on_cuda:
        for step in steps.values():
            rows.append(_largest_batch_row(step, cfg, device, dtype))
            _print(rows[-1])
    del steps
    free_memory(device)
    return rows


def _print(row: Row) -> None:
    print(f"train: {row.backend:16s} {row.shape:24s} {row.dtype} {row.median:,.1f} {row.unit} ({row.extra})",
          flush=True)


def run(device: str = "cuda", sizes: str = "gpt2", out_dir: str | Path | None = None,
        variants: tuple[str, ...] | None = None, samples: int | None = None,
        steps: int | None = None) -> list[Row]:
    """Run the named size set (contenders: `variants`, else the set's own list, else
    DEFAULT_VARIANTS); write train.csv / train.md into out_dir; return the rows."""
    if sizes in SIZE_SETS and variants is None:
        variants = SIZE_SETS[sizes].get("variants", DEFAULT_VARIANTS)
    on_cuda = start_suite("train", device, sizes, SIZE_SETS, variants or (), VARIANTS, what="variant")
    if on_cuda is None:
        return []
    spec = dict(SIZE_SETS[sizes])
    if spec["device"] == "cpu" and on_cuda:
        print(f"train: sizes={sizes!r} is the CPU case; skipped on {device}")
        return []
    spec.update({k: v for k, v in (("samples", samples), ("steps", steps)) if v})
    usable = []
    for variant in variants:
        reason = _skip_reason(variant, on_cuda)
        if reason:
            print(f"train: {variant} skipped ({reason})")
        else:
            usable.append(variant)
    dtype = spec["dtype"]
    previous_precision = torch.get_float32_matmul_precision()
    if on_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 on, as the recipe sets it (for every contender)
    # A shared CPU: contenders interleaved, so load changes hit all alike. A GPU: one at a
    # time, so that each has the whole memory and its peak is its own.
    groups = [[v] for v in usable] if on_cuda else [usable]
    rows: list[Row] = []
    try:
        for case in spec["cases"]:
            cfg = case.config()
            for group in groups:
                rows += _measure_group(group, cfg, case.batches, device, dtype, spec, on_cuda)
    finally:
        torch.set_float32_matmul_precision(previous_precision)
    if out_dir is not None and rows:
        _write(rows, Path(out_dir))
    return rows


def _write(rows: list[Row], out_dir: Path) -> None:
    sections = ["# Training-step benchmarks\n\nOne step = forward + backward + clip + AdamW. Ratios against "
                "the nanoGPT-style contender (`nanogpt`), measured in the same run (>1 is better; for memory, "
                "lower is better and the ratio is nanogpt / contender). `textbook` is fastgpt's own PyTorch "
                "reference, a second baseline. Per-step times come from samples of several steps each.\n"]
    for name in ("train_step", "train_step_peak_memory", "train_largest_batch"):
        group = [r for r in rows if r.name == name]
        if group:
            sections.append(f"\n## {name}\n\n" + markdown_table(group, baseline=BASELINE))
    write_results(rows, out_dir, "train", "".join(sections))


def main(argv: list[str] | None = None) -> int:
    def add(parser):
        parser.add_argument("--variants", default=None,
                            help=f"comma-separated subset of {', '.join(VARIANTS)} "
                                 f"(default: {','.join(DEFAULT_VARIANTS)}; the cpu size set: "
                                 f"{','.join(SIZE_SETS['cpu']['variants'])})")
        parser.add_argument("--samples", type=int, default=None, help="timed samples per contender and batch")
        parser.add_argument("--steps", type=int, default=None, help="training steps per timed sample")

    def run_kwargs(args):
        variants = tuple(v for v in args.variants.split(",") if v) if args.variants else None
        return {"variants": variants, "samples": args.samples,
                "steps": args.steps}
    return suite_main(argv, "train", __doc__, SIZE_SETS, run, BASELINE, add, run_kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
