"""Benchmark: one full training step (forward, backward, AdamW) of a whole GPT.

Variants, on the same model and batch in the same run:
  torch          - every op on its PyTorch reference (fastgpt.ops backend "torch");
  torch+compile  - the same under torch.compile;
  triton         - fastgpt's Triton kernels (backend "triton").
Reported: tokens/s (median over steps) with MFU in `extra` (FLOPs per token
6N + 12*L*H*Q*T, see fastgpt.train.mfu), then on CUDA the peak memory of one
step at B=8, T=1024 with and without the fused kernels, and the largest batch
that fits in memory for each backend (binary search over B; one step per probe).

Size sets: "gpt2" (CUDA, bf16 autocast): GPT-2 124M, B=8, T=1024;
"cpu" (any device, fp32 and bf16 autocast): a 4-layer 256-wide model, B=8, T=128;
"tiny": a smoke run for tests.

    python3 -m fastgpt.bench.train --device cuda --sizes gpt2 --out benchmarks/results/train
"""
from __future__ import annotations

import argparse
import contextlib
import gc
from pathlib import Path

import torch

from .. import ops
from ..config import preset
from ..errors import FastGPTError
from .common import Row, markdown_table, measure_ms, peak_memory_mib, start_suite, write_results

VARIANTS = ("torch", "torch+compile", "triton")
SIZE_SETS = {
    "gpt2": dict(device="cuda", model=("gpt2", {}), batch=8, context=1024, dtypes=(torch.bfloat16,),
                 memory=True),
    "cpu": dict(device="any", model=("mini", dict(context_length=128)), batch=8, context=128,
                dtypes=(torch.float32, torch.bfloat16), memory=False),
    "tiny": dict(device="any", model=("tiny", dict(context_length=32)), batch=2, context=32,
                 dtypes=(torch.float32,), memory=False),
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _usable(variant: str, device: str) -> str | None:
    """Why `variant` cannot run on `device` (None if it can)."""
    on_cuda = str(device).startswith("cuda")
    if variant == "triton" and not on_cuda:
        return "Triton kernels need CUDA (the CPU interpreter is for correctness, not speed)"
    if variant == "torch+compile" and not on_cuda:
        return "torch.compile on CPU is not what this benchmark is about (and slow to build)"
    return None


class _Step:
    """One model + AdamW + fixed batch; calling it runs one training step."""

    def __init__(self, cfg, batch: int, device: str, dtype: torch.dtype, variant: str):
        from ..model import GPT
        from ..train.optim import make_optimizer
        torch.manual_seed(0)
        self.backend = "triton" if variant == "triton" else "torch"
        self.model = GPT(cfg).to(device)
        self.optimizer = make_optimizer(self.model, 3e-4, 0.1, (0.9, 0.95), 1e-8, torch.device(device))
        self.forward = torch.compile(self.model) if variant.endswith("+compile") else self.model
        self.x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), device=device)
        self.y = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), device=device)
        self.device_type, self.dtype = torch.device(device).type, dtype

    def __call__(self):
        autocast = (contextlib.nullcontext() if self.dtype == torch.float32
                    else torch.autocast(device_type=self.device_type, dtype=self.dtype))
        with ops.use_backend(self.backend), autocast:
            loss = self.forward(self.x, self.y)
        with ops.use_backend(self.backend):
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def _free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def _throughput(cfg, batch, device, dtype, variant, warmup, repeats) -> Row:
    from ..train.mfu import model_flops_per_token, peak_flops
    step = _Step(cfg, batch, device, dtype, variant)
    med, p20, p80 = measure_ms(step, warmup=warmup, repeats=repeats, device=device)
    tokens = batch * cfg.context_length
    per_token = model_flops_per_token(step.model, cfg.context_length)
    peak = peak_flops(torch.device(device), dtype)
    mfu = f"{100 * tokens / (med / 1e3) * per_token / peak:.1f}%" if peak else "n/a"
    del step
    _free(device)
    return Row(name="train_step", backend=variant, shape=f"{_model_name(cfg)} B={batch} T={cfg.context_length}",
               dtype=DTYPE_NAMES[dtype], median=tokens / (med / 1e3), p20=tokens / (p80 / 1e3),
               p80=tokens / (p20 / 1e3), unit="tokens/s", device=_device_label(device),
               extra=f"ms={med:.2f};mfu={mfu};flops_per_token={per_token}")


def _peak_memory(cfg, batch, device, dtype, variant) -> Row:
    step = _Step(cfg, batch, device, dtype, variant)
    step()  # optimizer state allocated: measure a steady-state step
    mib = peak_memory_mib(step, device)
    del step
    _free(device)
    return Row(name="train_step_peak_memory", backend=variant,
               shape=f"{_model_name(cfg)} B={batch} T={cfg.context_length}", dtype=DTYPE_NAMES[dtype],
               median=mib, p20=mib, p80=mib, unit="MiB", device=_device_label(device))


def _fits(cfg, batch, device, dtype, variant) -> bool:
    step = None
    try:
        step = _Step(cfg, batch, device, dtype, variant)
        step()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del step
        _free(device)


def _largest_batch(cfg, device, dtype, variant, limit: int = 512) -> Row:
    """Largest B (<= limit) whose training step fits: doubling, then bisection."""
    good, bad = 0, None
    b = 1
    while b <= limit and _fits(cfg, b, device, dtype, variant):
        good, b = b, b * 2
    bad = b if b <= limit else None
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if _fits(cfg, mid, device, dtype, variant) else (good, mid)
    return Row(name="train_largest_batch", backend=variant, shape=f"{_model_name(cfg)} T={cfg.context_length}",
               dtype=DTYPE_NAMES[dtype], median=good, p20=good, p80=good, unit="sequences",
               device=_device_label(device), extra=f"limit={limit}")


def _model_name(cfg) -> str:
    return f"L{cfg.n_layer}-C{cfg.n_embd}"


def _device_label(device: str) -> str:
    from .common import device_name
    return device_name(device)


def run(device: str = "cuda", sizes: str = "gpt2", out_dir: str | Path | None = None,
        variants: tuple[str, ...] = VARIANTS, repeats: int | None = None) -> list[Row]:
    """Run the named size set; write train.csv / train.md into out_dir; return the rows."""
    on_cuda = start_suite("train", device, sizes, SIZE_SETS, variants, VARIANTS, what="variant")
    if on_cuda is None:
        return []
    spec = SIZE_SETS[sizes]
    usable = []
    for variant in variants:
        reason = _usable(variant, device)
        if reason:
            print(f"train: {variant} skipped ({reason})")
        else:
            usable.append(variant)
    name, overrides = spec["model"]
    cfg = preset(name, **overrides)
    warmup, repeats = (5, 50) if on_cuda else (1, repeats or 3)
    rows: list[Row] = []
    for dtype in spec["dtypes"]:
        for variant in usable:
            rows.append(_throughput(cfg, spec["batch"], device, dtype, variant, warmup, repeats))
            print(f"train: {rows[-1].backend} {rows[-1].dtype} {rows[-1].median:,.0f} tokens/s ({rows[-1].extra})")
    if spec["memory"] and on_cuda:
        dtype = spec["dtypes"][0]
        for variant in [v for v in ("torch", "triton") if v in usable]:
            rows.append(_peak_memory(cfg, 8, device, dtype, variant))
            rows.append(_largest_batch(cfg, device, dtype, variant))
            print(f"train: {variant} peak {rows[-2].median:,.0f} MiB at B=8; largest batch {rows[-1].median:.0f}")
    if out_dir is not None and rows:
        _write(rows, Path(out_dir))
    return rows


def _write(rows: list[Row], out_dir: Path) -> None:
    sections = ["# Training-step benchmarks\n\nOne step = forward + backward + AdamW. Ratios against the "
                "torch reference backend, measured in the same run (>1 is better; for memory, lower "
                "is better and the ratio is reference / variant).\n"]
    for name in ("train_step", "train_step_peak_memory", "train_largest_batch"):
        group = [r for r in rows if r.name == name]
        if group:
            sections.append(f"\n## {name}\n\n" + markdown_table(group, baseline="torch"))
    write_results(rows, out_dir, "train", "".join(sections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m fastgpt.bench.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="gpt2" if torch.cuda.is_available() else "cpu", choices=list(SIZE_SETS))
    parser.add_argument("--out", default=None, help="directory for train.csv / train.md")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    args = parser.parse_args(argv)
    try:
        rows = run(args.device, args.sizes, args.out, tuple(v for v in args.variants.split(",") if v))
    except FastGPTError as err:
        print(f"fastgpt.bench.train: error: {err}")
        return 2
    if rows:
        print(markdown_table([r for r in rows if r.name == "train_step"], baseline="torch"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
