"""Benchmark: greedy generation at batch 1, fastgpt vs Hugging Face `transformers`.

Both run the same random GPT-2 weights (a `GPT2LMHeadModel` is built, saved with
`save_pretrained`, and loaded into fastgpt with `fastgpt.weights.load_pretrained`), greedy, with
their KV caches, `new_tokens` tokens after a short random prompt, in the same run.
Tokens/s = new tokens / wall time of the whole generate call (prefill included);
median, p20, p80 over `repeats` calls after a warm-up call, the contenders taking
turns so that both see the same machine load. The notes add tokens per second of
process CPU time, which a busy shared machine disturbs far less than wall time.

Decoding one sequence is memory-bound: every new token reads every weight once.
The "bound" rows give that limit: memory bandwidth (measured here, in this run, by
summing a tensor far larger than the caches) / bytes of weights read per token.

    python3 benchmarks/bench_generate.py --sizes gpt2 --new-tokens 256
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ..config import preset
from ..errors import FastGPTError
from ..quantize import QUANTIZATIONS, quantize, weight_bytes_per_token
from ..weights import load_pretrained
from .common import Row, device_name, quantiles, write_csv

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fastgpt only, approximate (fastgpt.quantize): "int8" weights with one scale per row,
# "int4" weights with a scale and zero per group of 32; bf16 activations
INT8 = "int8"
INT4 = "int4"


def run(device: str = "cpu", sizes=("gpt2",), out_dir: str | Path = "benchmarks/results", new_tokens: int = 256,
        prompt_tokens: int = 8, repeats: int = 3, dtypes=None, hf_dtypes=("float32",),
        threads: int | Sequence[int] | None = None, command: str | None = None) -> list[Row]:
    """Measure, write `generate.csv` and `generate.md` into `out_dir`, return the rows.

    `sizes`: a preset name ("gpt2") or a list of them. `dtypes`: fastgpt weight dtypes
    to measure ("int8", "int4": weight-only quantization with bf16 activations, see
    fastgpt.quantize; default: all four, int4 on CPU only); `hf_dtypes`: transformers'
    (its default is float32). `threads`:
    torch CPU threads for every measurement, or a list of thread counts to measure one
    after the other (default: torch's current setting). `command`: the command
    line, written at the top of the Markdown file.
    """
    if isinstance(sizes, str):
        sizes = (sizes,)
    if dtypes is None:  # int4 uses ATen's CPU-only int4 matmul
        dtypes = ("float32", "bfloat16", INT8) + ((INT4,) if str(device) == "cpu" else ())
    for name in dtypes:
        if name not in DTYPES and name not in QUANTIZATIONS:
            raise FastGPTError(f"unknown fastgpt dtype {name!r} (choose from: {', '.join([*DTYPES, *QUANTIZATIONS])})")
    for name in hf_dtypes:
        if name not in DTYPES:
            raise FastGPTError(f"unknown transformers dtype {name!r} (choose from: {', '.join(DTYPES)})")
    if repeats < 1 or new_tokens < 2:
        raise FastGPTError("repeats must be >= 1 and new_tokens >= 2")
    rows: list[Row] = []
    for n in threads if isinstance(threads, (list, tuple)) else [threads]:
        with _threads(n):
            bandwidth = memory_bandwidth_gbs(device)
            for size in sizes:
                rows += _run_size(device, size, new_tokens, prompt_tokens, repeats, dtypes, hf_dtypes, bandwidth)
    out_dir = Path(out_dir)
    write_csv(rows, out_dir / "generate.csv")
    markdown = markdown_report(rows)
    if command:
        markdown = f"Command: `{command}`\n\n{markdown}"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "generate.md.tmp"
    tmp.write_text(markdown)
    tmp.replace(out_dir / "generate.md")
    return rows


@contextlib.contextmanager
def _threads(n: int | None):
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def memory_bandwidth_gbs(device: str, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of a few sums over a tensor far larger than any cache."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _hf_model(size: str):
    """A randomly initialised transformers GPT2LMHeadModel with the preset's shape (eval mode)."""
    import transformers
    cfg = preset(size)
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_eps)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(hf_cfg).eval()


def _time_interleaved(calls: dict, repeats: int, device: str) -> tuple[dict, dict]:
    """Wall and process-CPU seconds per call of each contender, calling them in turn
    (A B C A B C ...) so that a change in machine load mid-run hits them all alike.
    One warm-up call each first (allocations, lazy imports, kernel compilation).

    On a shared CPU the wall time includes waiting for a core; the CPU time (summed
    over this process's threads) does not, so it is the steadier measure of the work."""
    for fn in calls.values():
        fn()
    wall, cpu = {key: [] for key in calls}, {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return wall, cpu


def _run_size(device, size, new_tokens, prompt_tokens, repeats, dtypes, hf_dtypes, bandwidth) -> list[Row]:
    from ..generate import generate
    from ..model import GPT

    hf = _hf_model(size)
    # transformers cannot go past its context (tiny: 64 positions); fastgpt would slide its window
    new_tokens = min(new_tokens, hf.config.n_positions - prompt_tokens)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, hf.config.vocab_size, (1, prompt_tokens), generator=g)
    ids = prompt.to(device)
    shape = f"B=1 prompt={prompt_tokens} new={new_tokens} threads={torch.get_num_threads()}"
    name = f"generate {size}"
    outputs, calls = {}, {}

    def hf_call(model, key):
        def call():
            with torch.inference_mode():
                outputs[key] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                              min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                              pad_token_id=0, eos_token_id=None)
        return call

    def our_call(model, key):
        def call():
            outputs[key] = generate(model, prompt.tolist(), new_tokens, temperature=0, eos_id=None)
        return call

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)  # the same weights, through fastgpt's Hugging Face loader
        ours = {d: _load_ours(GPT, tmp, device, d) for d in dtypes}
    hf_float32 = hf.to(device)
    for d in hf_dtypes:
        model = hf_float32 if d == "float32" else copy.deepcopy(hf).to(device=device, dtype=DTYPES[d])
        calls[("transformers", d)] = hf_call(model, ("transformers", d))
    for d, model in ours.items():
        calls[("fastgpt", d)] = our_call(model, ("fastgpt", d))
    seconds, cpu_seconds = _time_interleaved(calls, repeats, device)

    reference = outputs[("transformers", "float32")][0, prompt_tokens:].tolist() \
        if ("transformers", "float32") in outputs else None
    agreement = {}
    if reference is not None:  # teacher-forced: each model's logits on transformers' fp32 text
        text = torch.tensor([prompt[0].tolist() + reference], device=device)
        with torch.inference_mode():
            exact = hf_float32(text).logits[0, prompt_tokens - 1:].float()
            for d, model in ours.items():
                agreement[d] = logit_agreement(model(text)[0, prompt_tokens - 1:].float(), exact)
    rows = []
    for (backend, d), secs in seconds.items():
        cpu_rate = quantiles([new_tokens / c for c in cpu_seconds[(backend, d)]])[0]
        extra = f"cpu_time_tokens_per_s={cpu_rate:.1f}"
        if backend == "fastgpt":
            stats, tokens = outputs[(backend, d)].stats, outputs[(backend, d)].tokens[0]
            extra += f";decode_tokens_per_s={stats.decode_tokens_per_s:.1f};ttft_ms={stats.first_token_s * 1e3:.1f}"
            if reference is not None:  # greedy tokens equal to transformers' float32 ones
                same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
                extra += f";first_{same}_of_{new_tokens}_tokens_equal_transformers_fp32"
            if d in agreement:
                extra += ";" + agreement[d]
        rows.append(_row(name, backend, shape, d, new_tokens, secs, device, extra))
    for d, model in ours.items():
        # The limit: every weight read once per token.
        weight_bytes = weight_bytes_per_token(model)
        bound = bandwidth * 1e9 / weight_bytes
        rows.append(Row(name, "bound (bandwidth)", shape, d, bound, bound, bound, "tokens/s",
                        device=device_name(device),
                        extra=f"bandwidth_GBps={bandwidth:.1f};weight_MB={weight_bytes / 1e6:.0f}"))
    return rows


def logit_agreement(logits: torch.Tensor, exact: torch.Tensor) -> str:
    """How close (T, V) logits are to the exact ones on the same text: the share of
    positions whose top token is the same, and the largest and relative errors."""
    top1 = (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()
    max_err = (logits - exact).abs().max().item()
    rel_err = ((logits - exact).norm() / exact.norm()).item()
    return f"teacher_forced_top1_agree={top1:.1%};logit_max_abs_err={max_err:.3g};logit_rel_err={rel_err:.3g}"


def _load_ours(GPT, directory, device, dtype_name):
    if dtype_name in QUANTIZATIONS:
        return quantize(load_pretrained(directory, device=device), dtype_name)
    return load_pretrained(directory, device=device, dtype=DTYPES[dtype_name])


def _row(name, backend, shape, dtype_name, new_tokens, seconds, device, extra="") -> Row:
    rates = [new_tokens / s for s in seconds]
    median, p20, p80 = quantiles(rates)
    return Row(name, backend, shape, dtype_name, median, p20, p80, "tokens/s", device=device_name(device),
               extra=extra)


def markdown_report(rows: list[Row]) -> str:
    """One table per model size and thread count, every row's ratio against transformers
    at float32 of the same table."""
    lines = []
    for name, shape in dict.fromkeys((r.name, r.shape) for r in rows):
        group = [r for r in rows if (r.name, r.shape) == (name, shape)]
        base = next((r for r in group if r.backend == "transformers" and r.dtype == "float32"), None)
        lines += [f"### {name} ({group[0].shape}, {group[0].device}, {group[0].date}, commit {group[0].commit})", "",
                  "| backend | dtype | tokens/s median | p20 | p80 | vs transformers float32 | notes |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in group:
            ratio = f"{r.median / base.median:.2f}x" if base and base.median else ""
            lines.append(f"| {r.backend} | {r.dtype} | {r.median:.1f} | {r.p20:.1f} | {r.p80:.1f} | {ratio} "
                         f"| {r.extra.replace(';', ', ')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greedy generation at batch 1: fastgpt vs transformers, "
                                                 "plus the memory-bandwidth bound.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["gpt2"], choices=["gpt2", "tiny", "mini"])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=None,
                        choices=[*DTYPES, *QUANTIZATIONS],
                        help="fastgpt weight dtypes (int8, int4: weight-only quantization, bf16 activations, "
                             "approximate; default: all, int4 on CPU only)")
    parser.add_argument("--hf-dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch CPU threads; several counts are measured one after the other "
                             "(default: torch's, one per core)")
    args = parser.parse_args(argv)
    command = "PYTHONPATH=. python3 benchmarks/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = run(args.device, args.sizes, args.out_dir, args.new_tokens, args.prompt_tokens, args.repeats,
               args.dtypes, args.hf_dtypes, args.threads, command=command)
    print(markdown_report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
