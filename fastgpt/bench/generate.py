"""Benchmark: greedy generation at batch 1, fastgpt vs Hugging Face `transformers`.

Both run the same random GPT-2-shaped weights (a `GPT2LMHeadModel` is built, saved with
`save_pretrained`, and loaded into fastgpt with `fastgpt.weights.load_pretrained`), greedy, with
their KV caches, `new_tokens` tokens after a short random prompt, in the same run.
Tokens/s = new tokens / wall time of the whole generate call (prefill included);
median, p20, p80 over `repeats` calls after a warm-up call, the contenders taking
turns so that both see the same machine load. Per fastgpt mode the rows also give the
time to first token, the share of the bandwidth bound reached, how many greedy tokens
equal transformers' fp32 ones, and tokens per second of process CPU time, which a busy
shared machine disturbs far less than wall time. Every row records the CPU's capability
class (AMX, AVX512-BF16, AVX512, AVX2), which decides the modes' dtypes.

Modes: fp32, bf16, fp16, "16bit" (the 16-bit format this machine reads fastest:
bf16 on GPUs and CPUs with native bf16, fp16 on other CPUs with F16C), int8, int4
(fastgpt.quantize: approximate; their activations follow the CPU too; "int8:dynamic" and
"int8:weight-only" force one int8 kernel, with the activations it wants), and with
`compile=True` fp32 through torch.compile.

llama.cpp (optional, `llama_cpp=("f32", "f16", "q8_0")`, CLI `--llama-cpp`): the same weights
written to GGUF by fastgpt.weights.gguf_export, run through llama-cpp-python with the same
threads, fed the same prompt ids, greedy (fastgpt.bench.llamacpp); in the same turns as the
others. Off unless asked for: which rows a run has should not depend on what is installed.

Decoding one sequence is memory-bound: every new token reads every weight once. The
"bound" rows give that limit: READ bandwidth (measured here, in this run, by summing a
tensor far larger than the caches, with the run's thread count) / bytes of weights read
per token. (Half a copy's bandwidth undercounts it: llama.cpp beat such a bound.)

    python3 benchmarks/bench_generate.py --sizes gpt2 --new-tokens 256
    python3 benchmarks/bench_generate.py --speculative runs/target/model runs/draft/model
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

from .. import native_linear
from ..config import preset
from ..errors import FastGPTError
from ..gpt2_vocab import GPT2_VOCAB_SIZE
from ..native_linear import NativeLinear
from ..quantize import INT8_KERNELS, QUANTIZATIONS, quantize, weight_bytes_per_token
from ..runtime import CANONICAL_DTYPES, canonical_dtype_name, cpu_capabilities, describe_machine, fastest_cpu_half_dtype
from ..streaming_linear import StreamingLinear, prepare_for_decoding
from ..weights import load_pretrained
from .common import Row, device_name, quantiles, write_csv

# model shapes: the presets, and `make demo`'s model (4 layers x 256, its 4096-token BPE)
SIZES = {"gpt2": preset("gpt2"), "mini": preset("mini"), "tiny": preset("tiny"),
         "demo": preset("mini", vocab_size=4096, context_length=128)}
# what `fastgpt bench generate --sizes NAME` measures
SIZE_SETS = {"tiny": ("tiny",), "gpt2": ("gpt2",), "cpu": ("demo", "gpt2")}
HALF = "16bit"
# int8 with a chosen kernel instead of the CPU's default (fastgpt.quantize.INT8_KERNELS)
INT8_WITH_KERNEL = {f"int8:{kernel}": kernel for kernel in INT8_KERNELS}
MODES = (*CANONICAL_DTYPES, HALF, *QUANTIZATIONS, *INT8_WITH_KERNEL)
COMPILED = "fastgpt+compile"
LLAMA_CPP = "llama.cpp"


def half_dtype(device: str) -> torch.dtype | None:
    """The 16-bit weight format of the "16bit" mode on `device`, or None (no fast one).
    On CPUs where fastgpt's C kernel builds: fp16, llama.cpp's f16 (the kernel widens it to
    float32 in registers, so the CPU's 16-bit arithmetic does not matter). Without it, the
    format PyTorch reads fastest: an AVX2 CPU emulates bf16 (~100x slower matmuls) but
    converts fp16 in hardware (F16C); where both are native, a timing decides
    (`fastest_cpu_half_dtype`)."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if native_linear.available("f16"):
        return torch.float16
    return fastest_cpu_half_dtype()


def mode_name(name: str) -> str:
    """'float32' -> 'fp32', 'int8' -> 'int8', '16bit' -> '16bit'; unknown modes are one-line errors."""
    if name in QUANTIZATIONS or name == HALF or name in INT8_WITH_KERNEL:
        return name
    try:
        return canonical_dtype_name(name)
    except FastGPTError:
        raise FastGPTError(f"unknown fastgpt mode {name!r} (choose from: {', '.join(MODES)})") from None


def default_modes(device: str) -> list[str]:
    """fp32, the device's 16-bit format, and on CPUs int8 and int4."""
    modes = ["fp32"]
    if half_dtype(device) is not None:
        modes.append(HALF)
    if not str(device).startswith("cuda"):
        modes += list(QUANTIZATIONS)
    return modes


def run(device: str = "cpu", sizes=("gpt2",), out_dir: str | Path | None = "benchmarks/results",
        new_tokens: int = 256, prompt_tokens: int = 8, repeats: int = 3, dtypes=None, hf_dtypes=("fp32",),
        threads: int | Sequence[int] | None = None, command: str | None = None, compile: bool = False,
        llama_cpp: Sequence[str] = ()) -> list[Row]:
    """Measure, write `generate.csv` and `generate.md` into `out_dir`, return the rows.

    `sizes`: a size name ("gpt2", "demo", ...), a size set of `SIZE_SETS`, or a list of
    names. `dtypes`: fastgpt modes (see the module docstring; default `default_modes`);
    `hf_dtypes`: transformers' (its default is fp32). `threads`: torch CPU threads for
    every measurement, or a list of thread counts measured one after the other (default:
    torch's current setting). `compile`: add fp32 through torch.compile. `llama_cpp`: GGUF
    types ("f32", "f16", "q8_0") to run in llama.cpp as well. `command`: the command line,
    written at the top of the Markdown file.
    """
    if isinstance(sizes, str):
        sizes = SIZE_SETS.get(sizes, (sizes,))
    for size in sizes:
        if size not in SIZES:
            raise FastGPTError(f"unknown size {size!r} (choose from: {', '.join(SIZES)})")
    modes = [mode_name(d) for d in (dtypes if dtypes is not None else default_modes(device))]
    if HALF in modes and half_dtype(device) is None:
        raise FastGPTError(f"mode {HALF}: {describe_machine(torch.device(device))} has no fast 16-bit format")
    hf_modes = [mode_name(d) for d in hf_dtypes]
    if any(d not in CANONICAL_DTYPES for d in hf_modes):
        raise FastGPTError(f"transformers dtypes: choose from {', '.join(CANONICAL_DTYPES)}")
    if repeats < 1 or new_tokens < 2:
        raise FastGPTError("repeats must be >= 1 and new_tokens >= 2")
    llama_cpp = list(llama_cpp or ())
    if llama_cpp:
        from ..weights.gguf_export import GGUF_TYPES
        from .llamacpp import available
        if any(t not in GGUF_TYPES for t in llama_cpp):
            raise FastGPTError(f"llama.cpp types: choose from {', '.join(GGUF_TYPES)}, got {' '.join(llama_cpp)}")
        if not available():
            raise FastGPTError("llama.cpp contender: needs the packages llama-cpp-python and gguf "
                               "(pip install gguf llama-cpp-python)")
    rows: list[Row] = []
    for n in threads if isinstance(threads, (list, tuple)) else [threads]:
        with _threads(n):
            bandwidth = memory_bandwidth_gbs(device)
            for size in sizes:
                rows += _run_size(device, size, new_tokens, prompt_tokens, repeats, modes, hf_modes, bandwidth,
                                  compile, llama_cpp)
    markdown = markdown_report(rows, machine=describe_machine(torch.device(device)))
    if command:
        markdown = f"Command: `{command}`\n\n{markdown}"
    if out_dir is not None:
        _write(rows, markdown, Path(out_dir), "generate")
    return rows


def _write(rows: list[Row], markdown: str, out_dir: Path, stem: str) -> None:
    write_csv(rows, out_dir / f"{stem}.csv")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{stem}.md.tmp"
    tmp.write_text(markdown)
    tmp.replace(out_dir / f"{stem}.md")


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
    """READ bandwidth in GB/s: the best of a few sums over a tensor far larger than any cache
    (a sum reads each byte once and writes nothing, like a GEMV streaming its weights)."""
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
    """A randomly initialised transformers GPT2LMHeadModel with the size's shape (eval mode)."""
    import transformers
    cfg = SIZES[size]
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


def _run_size(device, size, new_tokens, prompt_tokens, repeats, modes, hf_modes, bandwidth, compile,
              llama_cpp=()) -> list[Row]:
    with contextlib.ExitStack() as stack:  # closes llama.cpp's models, then removes their GGUF files
        return _measure_size(stack, device, size, new_tokens, prompt_tokens, repeats, modes, hf_modes, bandwidth,
                             compile, llama_cpp)


def _measure_size(stack, device, size, new_tokens, prompt_tokens, repeats, modes, hf_modes, bandwidth, compile,
                  llama_cpp) -> list[Row]:
    from ..generate import generate

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

    def our_call(model, key, compiled=False):
        def call():
            outputs[key] = generate(model, prompt.tolist(), new_tokens, temperature=0, eos_id=None, compile=compiled)
        return call

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)  # the same weights, through fastgpt's Hugging Face loader
        ours = {m: _load_ours(tmp, device, m) for m in modes}
        llama = _load_llama_cpp(stack, tmp, llama_cpp, torch.get_num_threads())
    hf_fp32 = hf.to(device)
    for d in hf_modes:
        model = hf_fp32 if d == "fp32" else copy.deepcopy(hf).to(device=device, dtype=CANONICAL_DTYPES[d])
        calls[("transformers", d)] = hf_call(model, ("transformers", d))
    for m, model in ours.items():
        calls[("fastgpt", m)] = our_call(model, ("fastgpt", m))
    if compile:
        ours_compiled = ours["fp32"] if "fp32" in ours else _load_ours_from_hf(hf_fp32, device)
        calls[(COMPILED, "fp32")] = our_call(ours_compiled, (COMPILED, "fp32"), compiled=True)
    for t, (runner, _) in llama.items():
        calls[(LLAMA_CPP, t)] = _llama_call(runner, prompt[0].tolist(), new_tokens, outputs, (LLAMA_CPP, t))
    seconds, cpu_seconds = _time_interleaved(calls, repeats, device)

    reference = outputs[("transformers", "fp32")][0, prompt_tokens:].tolist() \
        if ("transformers", "fp32") in outputs else None
    agreement = {}
    if reference is not None:  # teacher-forced: each model's logits on transformers' fp32 text
        text = torch.tensor([prompt[0].tolist() + reference], device=device)
        with torch.inference_mode():
            exact = hf_fp32(text).logits[0, prompt_tokens - 1:].float()
            for m, model in ours.items():
                agreement[m] = logit_agreement(model(text)[0, prompt_tokens - 1:].float(), exact)
    bounds = {m: bandwidth * 1e9 / weight_bytes_per_token(model) for m, model in ours.items()}
    llama_bounds = {t: bandwidth * 1e9 / weight_bytes for t, (_, weight_bytes) in llama.items()}
    level = cpu_capabilities().level if not str(device).startswith("cuda") else "cuda"
    rows = []
    for (backend, d), secs in seconds.items():
        cpu_rate = quantiles([new_tokens / c for c in cpu_seconds[(backend, d)]])[0]
        extra = f"cpu={level};cpu_time_tokens_per_s={cpu_rate:.1f}"
        if backend == LLAMA_CPP:
            result = outputs[(backend, d)]
            tokens = result.tokens
            decode_rate = (new_tokens - 1) / max(result.total_s - result.first_token_s, 1e-9)
            extra += f";ttft_ms={result.first_token_s * 1e3:.1f};decode_tokens_per_s={decode_rate:.1f}"
            extra += f";llama_cpp_python={_llama_version()}"
            extra += f";bound_share={quantiles([new_tokens / s for s in secs])[0] / llama_bounds[d]:.3f}"
        elif backend != "transformers":
            result = outputs[(backend, d)]
            stats, tokens = result.stats, result.tokens[0]
            extra += f";ttft_ms={stats.first_token_s * 1e3:.1f};decode_tokens_per_s={stats.decode_tokens_per_s:.1f}"
            model = ours.get(d) or ours_compiled
            extra += f";activations={_activation_name(model)}"
            if isinstance(model.lm_head, StreamingLinear):
                extra += f";layout=streaming(splits={model.lm_head.splits})"
            elif isinstance(model.lm_head, NativeLinear):
                extra += f";layout=c_kernel({model.lm_head.fmt})"
            if d in bounds:
                extra += f";bound_share={quantiles([new_tokens / s for s in secs])[0] / bounds[d]:.3f}"
        if backend != "transformers":
            if reference is not None:  # greedy tokens equal to transformers' fp32 ones
                same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b),
                            len(reference))
                extra += f";equal_tokens={same}/{new_tokens}"
            if backend == "fastgpt" and d in agreement:
                extra += ";" + agreement[d]
        rows.append(_row(name, backend, shape, d, new_tokens, secs, device, extra))
    for m, model in ours.items():
        # The limit: every weight read once per token.
        weight_bytes = weight_bytes_per_token(model)
        rows.append(Row(name, "bound (bandwidth)", shape, m, bounds[m], bounds[m], bounds[m], "tokens/s",
                        device=device_name(device),
                        extra=f"cpu={level};read_bandwidth_GBps={bandwidth:.1f};weight_MB={weight_bytes / 1e6:.0f}"))
    for t, (_, weight_bytes) in llama.items():
        rows.append(Row(name, "bound (bandwidth)", shape, f"gguf {t}", llama_bounds[t], llama_bounds[t],
                        llama_bounds[t], "tokens/s", device=device_name(device),
                        extra=f"cpu={level};read_bandwidth_GBps={bandwidth:.1f};weight_MB={weight_bytes / 1e6:.0f}"))
    return rows


def _load_llama_cpp(stack, hf_dir, types, threads) -> dict:
    """GGUF type -> (a llama.cpp runner, weight bytes per token) for the weights in `hf_dir`; the files
    lie in a temporary folder that `stack` removes after closing the runners. A vocabulary other
    than GPT-2's gets an ids-only file: the benchmark feeds ids and never needs text."""
    if not types:
        return {}
    from ..weights.gguf_export import weight_bytes_per_token as gguf_bytes
    from ..weights.gguf_export import write_gguf
    from .llamacpp import LlamaCppGreedy

    model = load_pretrained(hf_dir, device="cpu", dtype=torch.float32)  # plain nn.Linear weights, not streamed
    gguf_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    ids_only = model.config.vocab_size != GPT2_VOCAB_SIZE
    runners = {}
    for t in types:
        path = write_gguf(model, gguf_dir / f"model-{t}.gguf", t, ids_only=ids_only)
        runner = LlamaCppGreedy(path, n_ctx=model.config.context_length, threads=threads)
        stack.callback(runner.close)
        runners[t] = (runner, gguf_bytes(model, t))
    return runners


def _llama_call(runner, prompt_ids, new_tokens, outputs, key):
    def call():
        outputs[key] = runner.generate(prompt_ids, new_tokens)
    return call


def _llama_version() -> str:
    from .llamacpp import version
    return version()


def _activation_name(model) -> str:
    from ..runtime import dtype_name
    return dtype_name(model.tok_emb.weight.dtype)


def logit_agreement(logits: torch.Tensor, exact: torch.Tensor) -> str:
    """How close (T, V) logits are to the exact ones on the same text: the share of
    positions whose top token is the same, and the largest and relative errors."""
    top1 = (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()
    max_err = (logits - exact).abs().max().item()
    rel_err = ((logits - exact).norm() / exact.norm()).item()
    return f"teacher_forced_top1_agree={top1:.1%};logit_max_abs_err={max_err:.3g};logit_rel_err={rel_err:.3g}"


def _load_ours(directory, device, mode):
    """fastgpt's model in `mode`: quantized ones get the CPU's activation dtype (fastgpt.quantize)."""
    if mode in QUANTIZATIONS:
        return quantize(load_pretrained(directory, device=device), mode)
    if mode in INT8_WITH_KERNEL:
        return quantize(load_pretrained(directory, device=device), "int8", kernel=INT8_WITH_KERNEL[mode])
    dtype = half_dtype(device) if mode == HALF else CANONICAL_DTYPES[mode]
    model = load_pretrained(directory, device=device, dtype=dtype)
    prepare_for_decoding(model)  # as `fastgpt generate` does
    return model


def _load_ours_from_hf(hf, device):
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        return load_pretrained(tmp, device=device)


def _row(name, backend, shape, dtype_name, new_tokens, seconds, device, extra="") -> Row:
    rates = [new_tokens / s for s in seconds]
    median, p20, p80 = quantiles(rates)
    return Row(name, backend, shape, dtype_name, median, p20, p80, "tokens/s", device=device_name(device),
               extra=extra)


def _extra(row: Row, key: str, default: str = "") -> str:
    for item in row.extra.split(";"):
        k, _, v = item.partition("=")
        if k == key:
            return v
    return default


def markdown_report(rows: list[Row], machine: str = "") -> str:
    """One table per model size and thread count, every row's ratio against transformers
    at fp32 of the same table."""
    lines = [f"Machine: {machine}", ""] if machine else []
    for name, shape in dict.fromkeys((r.name, r.shape) for r in rows):
        group = [r for r in rows if (r.name, r.shape) == (name, shape)]
        base = next((r for r in group if r.backend == "transformers" and r.dtype == "fp32"), None)
        lines += [f"### {name} ({group[0].shape}, {group[0].device}, {group[0].date}, commit {group[0].commit})", "",
                  "| backend | mode | tokens/s median | p20 | p80 | vs transformers fp32 | time to first token "
                  "| share of bound | greedy tokens equal to transformers fp32 | notes |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in group:
            ratio = f"{r.median / base.median:.2f}x" if base and base.median else ""
            ttft = _extra(r, "ttft_ms")
            share = _extra(r, "bound_share")
            share = f"{float(share):.0%}" if share else ""
            notes = ", ".join(i for i in r.extra.split(";")
                              if i.partition("=")[0] not in ("ttft_ms", "bound_share", "equal_tokens"))
            lines.append(f"| {r.backend} | {r.dtype} | {r.median:.1f} | {r.p20:.1f} | {r.p80:.1f} | {ratio} "
                         f"| {ttft + ' ms' if ttft else ''} | {share} | {_extra(r, 'equal_tokens')} | {notes} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- speculative decoding
SPECULATIVE_PROMPTS = ("ROMEO:\n", "KING HENRY V:\n", "First Citizen:\nBefore we proceed any further, hear me speak.\n",
                       "HAMLET:\nTo be, or not to be")


def run_speculative(model_dir: str, draft_dir: str, out_dir: str | Path | None = "benchmarks/results",
                    new_tokens: int = 128, ks: Sequence[int] = (2, 4, 6), repeats: int = 3,
                    prompts: Sequence[str] = SPECULATIVE_PROMPTS, threads: int | None = None,
                    command: str | None = None) -> list[Row]:
    """Decoding of trained models on CPU: the target alone vs speculative decoding with the
    draft (each k of `ks`) and with prompt lookup, greedy, plus the largest k with sampling,
    on the same prompts, in turns. Every greedy speculative output must equal the plain one
    token for token (else an error); rows give tokens/s, the speedup over the target alone
    (greedy or sampling), the acceptance rate and the mean accepted length."""
    from ..generate import generate
    from ..tokenizer import load_tokenizer
    from ..weights import load_fastgpt, resolve

    with _threads(threads):
        target, _ = load_fastgpt(model_dir, device="cpu", dtype=torch.float32)
        draft, _ = load_fastgpt(draft_dir, device="cpu", dtype=torch.float32)
        sizes = [m.num_parameters() / 1e6 for m in (target, draft)]  # (the C kernel's matrices are buffers)
        for model in (target, draft):  # as `fastgpt generate --draft` does
            prepare_for_decoding(model)
        tokenizer = load_tokenizer(resolve(model_dir))
        ids = [tokenizer.encode(p) for p in prompts]
        greedy, sampled = dict(temperature=0), dict(temperature=0.8, top_k=40, seed=0)
        contenders = {"target alone": greedy, "prompt lookup k=4": dict(greedy, prompt_lookup=True, speculate_k=4)}
        contenders |= {f"draft k={k}": dict(greedy, draft=draft, speculate_k=k) for k in ks}
        # Sampling (T=0.8, top-k 40): no identity to check, but text that does not loop the way
        # greedy text of a small model does, so its acceptance is the less flattering one.
        contenders |= {"target alone, sampling": sampled, f"draft k={max(ks)}, sampling": dict(sampled, draft=draft,
                                                                                                 speculate_k=max(ks))}
        outputs: dict[str, list] = {}

        def call(key, options):
            def run_all():
                outputs[key] = [generate(target, [p], new_tokens, eos_id=None, **options) for p in ids]
            return run_all

        wall, cpu = _time_interleaved({k: call(k, o) for k, o in contenders.items()}, repeats, "cpu")
        shape = (f"B=1 prompts={len(ids)} new={new_tokens} threads={torch.get_num_threads()} "
                 f"target={sizes[0]:.1f}M draft={sizes[1]:.1f}M")
        total = new_tokens * len(ids)
        rows = []
        for key in contenders:
            is_sampling = key.endswith("sampling")
            plain = "target alone, sampling" if is_sampling else "target alone"
            base = quantiles([total / s for s in wall[plain]])[0]
            if not is_sampling and [r.tokens for r in outputs[key]] != [r.tokens for r in outputs[plain]]:
                raise FastGPTError(f"speculative benchmark: {key} changed the greedy tokens")
            extra = f"cpu={cpu_capabilities().level};cpu_time_tokens_per_s={total / min(cpu[key]):.1f}"
            if key != plain:
                proposed = sum(r.speculation.proposed for r in outputs[key])
                accepted = sum(r.speculation.accepted for r in outputs[key])
                steps = sum(r.speculation.steps for r in outputs[key])
                median = quantiles([total / s for s in wall[key]])[0]
                extra += (f";speedup={median / base:.2f}x;acceptance={accepted / max(proposed, 1):.1%}"
                          f";mean_accepted={accepted / max(steps, 1):.2f}")
                if not is_sampling:
                    extra += ";tokens_equal_plain=all"
            rows.append(_row("speculative greedy", key, shape, "fp32", total, wall[key], "cpu", extra))
    lines = [f"Machine: {describe_machine(torch.device('cpu'))}", "",
             f"### speculative greedy decoding ({shape}, {rows[0].date}, commit {rows[0].commit})", "",
             "| contender | tokens/s median | p20 | p80 | speedup | acceptance | mean accepted per pass | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.backend} | {r.median:.1f} | {r.p20:.1f} | {r.p80:.1f} | {_extra(r, 'speedup', '1.00x')} "
                     f"| {_extra(r, 'acceptance')} | {_extra(r, 'mean_accepted')} "
                     f"| {_extra(r, 'cpu_time_tokens_per_s')} tokens/s of CPU time |")
    markdown = "\n".join(lines) + "\n"
    if command:
        markdown = f"Command: `{command}`\n\n{markdown}"
    if out_dir is not None:
        _write(rows, markdown, Path(out_dir), "speculative")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greedy generation at batch 1: fastgpt vs transformers, "
                                                 "plus the memory-bandwidth bound; or speculative decoding.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["gpt2"], choices=[*SIZES, *SIZE_SETS])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=None, metavar="MODE",
                        help=f"fastgpt modes: {', '.join(MODES)} (torch's dtype names too; int8/int4: "
                             "approximate; default: fp32, 16bit, and on CPUs int8, int4)")
    parser.add_argument("--hf-dtypes", nargs="+", default=["fp32"])
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch CPU threads; several counts are measured one after the other "
                             "(default: torch's, one per core)")
    parser.add_argument("--compile", action="store_true", help="add fastgpt fp32 through torch.compile")
    parser.add_argument("--llama-cpp", nargs="*", default=None, metavar="TYPE",
                        help="add llama.cpp (needs pip install gguf llama-cpp-python) on the same weights written "
                             "to GGUF: f32, f16, q8_0 (default with no TYPE: all three); same threads, prompt ids "
                             "and token count; off unless given")
    parser.add_argument("--speculative", nargs=2, metavar=("MODEL", "DRAFT"), default=None,
                        help="instead: speculative greedy decoding of trained MODEL with DRAFT (and prompt "
                             "lookup) against MODEL alone, on CPU")
    parser.add_argument("--speculate-k", type=int, nargs="+", default=[2, 4, 6])
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = "PYTHONPATH=. python3 benchmarks/bench_generate.py " + " ".join(given)
    try:
        if args.speculative:
            rows = run_speculative(*args.speculative, out_dir=args.out_dir, new_tokens=args.new_tokens,
                                   ks=args.speculate_k, repeats=args.repeats,
                                   threads=args.threads[0] if args.threads else None, command=command)
            print((Path(args.out_dir) / "speculative.md").read_text())
            return 0
        sizes = [s for name in args.sizes for s in SIZE_SETS.get(name, (name,))]
        rows = run(args.device, sizes, args.out_dir, args.new_tokens, args.prompt_tokens, args.repeats,
                   args.dtypes, args.hf_dtypes, args.threads, command=command, compile=args.compile,
                   llama_cpp=(args.llama_cpp or ["f32", "f16", "q8_0"]) if args.llama_cpp is not None else ())
    except FastGPTError as err:
        print(f"bench_generate: error: {err}", file=sys.stderr)
        return 2
    print(markdown_report(rows, machine=describe_machine(torch.device(args.device))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
