"""`fastgpt bench`: run the benchmark suites, each against its baseline in the same run."""
from __future__ import annotations

import importlib
import time

from ..errors import FastGPTError

# suite -> module under fastgpt.bench; each module has run(device, sizes, out_dir) -> rows
SUITES = {
    "kernels": "kernels",      # LayerNorm, bias+GELU, cross-entropy, fused linear+CE vs eager / torch.compile
    "attention": "attention",  # flash attention fwd/bwd, decode attention vs eager / SDPA
    "generate": "generate",    # tokens/s at batch 1 vs transformers.generate, bandwidth bound
    "train": "train",          # training step tokens/s, MFU, peak memory: fastgpt vs the nanoGPT recipe
    "serve": "serve",          # fastgpt serve: N concurrent clients vs the same requests one at a time, TTFT
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark kernels, attention, generation and training against their baselines",
        description="Run benchmark suites. Each writes <suite>.csv (name, backend, shape, dtype, median, "
                    "p20, p80, unit, device, date, commit) and <suite>.md (ratios against the baseline "
                    "measured in the same run) into --out. GPU-only cases are skipped on CPU with a message.")
    p.add_argument("suite", nargs="?", default="all", choices=[*SUITES, "all"],
                   help="which suite to run (default: all)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--sizes", default=None, choices=["tiny", "cpu", "gpt2"],
                   help="tiny: seconds on a CPU (smoke run); cpu: the CPU training case (GPT-2 124M at B=4, "
                        "T=256; suites without a cpu set skip it); gpt2: GPT-2 124M shapes "
                        "(default: gpt2 on CUDA, tiny on CPU)")
    p.add_argument("--out", default="benchmarks/results/latest", help="output folder (default: %(default)s)")
    p.add_argument("--url", default=None, help="serve: a running fastgpt serve (default: start one, random weights)")
    p.add_argument("--clients", type=int, default=None, help="serve: concurrent clients (default: 16 for gpt2)")
    p.add_argument("--llama-cpp", nargs="*", default=None, metavar="TYPE",
                   help="generate: add llama.cpp (pip install gguf llama-cpp-python) on the same weights as GGUF "
                        "f32, f16, q8_0 (no TYPE: all three); off unless given")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FastGPTError("--device cuda: no CUDA GPU is visible")
    sizes = args.sizes or ("gpt2" if device.startswith("cuda") else "tiny")
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    failed = []
    for suite in suites:
        module = importlib.import_module(f"fastgpt.bench.{SUITES[suite]}")
        if sizes not in getattr(module, "SIZE_SETS", {sizes: None}):
            print(f"bench {suite}: no {sizes!r} size set; skipped", flush=True)
            continue
        print(f"== bench {suite} (device={device}, sizes={sizes}) -> {args.out}", flush=True)
        start = time.perf_counter()
        try:
            options = {}
            if suite == "serve":
                options = {"url": args.url, "clients": args.clients}
            elif suite == "generate" and args.llama_cpp is not None:
                options = {"llama_cpp": tuple(args.llama_cpp or ("f32", "f16", "q8_0"))}
            rows = module.run(device=device, sizes=sizes, out_dir=args.out, **options)
        except Exception as err:  # one suite failing must not lose the others' results
            print(f"bench {suite}: FAILED: {type(err).__name__}: {err}", flush=True)
            failed.append(suite)
            continue
        print(f"bench {suite}: {len(rows)} rows in {time.perf_counter() - start:.1f} s", flush=True)
    if failed:
        raise FastGPTError(f"suites failed: {', '.join(failed)}")
    return 0
