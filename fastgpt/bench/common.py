"""Timing, result rows, and CSV/Markdown output shared by every benchmark."""
from __future__ import annotations

import csv
import datetime
import gc
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from ..runtime import describe_machine

COLUMNS = ["name", "backend", "shape", "dtype", "median", "p20", "p80", "unit", "device", "date", "commit", "extra"]


@dataclass
class Row:
    """One measurement. `median/p20/p80` are in `unit` (ms, tokens/s, GB/s, TFLOP/s, MiB, ...)."""
    name: str
    backend: str
    shape: str
    dtype: str
    median: float
    p20: float
    p80: float
    unit: str
    device: str = field(default_factory=lambda: device_name())
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    commit: str = field(default_factory=lambda: git_commit())
    extra: str = ""  # free-form "key=value;key=value" (GB/s, peak MiB, ...)


def device_name(device: str | None = None) -> str:
    """The card, or the CPU model with its capability class and the threads torch uses."""
    if (device is None and torch.cuda.is_available()) or (device and str(device).startswith("cuda")):
        return torch.cuda.get_device_name()
    return f"{describe_machine(torch.device('cpu'))}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    """HEAD's short hash; env FASTGPT_COMMIT wins (a copied tree can carry a stale .git)."""
    if os.environ.get("FASTGPT_COMMIT"):
        return os.environ["FASTGPT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measure_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10,
               device: str = "cpu") -> tuple[float, float, float]:
    """(median, p20, p80) wall time of `fn()` in milliseconds.

    On CUDA this uses triton.testing.do_bench (L2 flushed, events); on CPU plain
    perf_counter over `repeats` calls after `warmup` calls.
    """
    if str(device).startswith("cuda"):
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=max(warmup, 25), rep=max(repeats, 100), quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles(times)


def measure_steps_ms(step: Callable[[], object], steps_per_sample: int, samples: int, warmup: int = 1,
                     device: str = "cpu") -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call of `step`, each sample timing `steps_per_sample`
    calls back to back (host time included, one device sync per sample).

    For a training step: one step per sample would put the host/device overlap between
    steps, and any one-off stall, into every number; several per sample is what a run sees.
    """
    on_cuda = str(device).startswith("cuda")

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(steps_per_sample):
            step()
        sync()
        times.append((time.perf_counter() - start) * 1e3 / steps_per_sample)
    return quantiles(times)


def free_memory(device: str) -> None:
    """Release what the last measurement left, so the next one starts from the same state."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of samples."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated while running `fn` (MiB), or None on CPU."""
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cuda_peak_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated in total (resident tensors included) while `fn` runs, MiB;
    None on CPU."""
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def write_csv(rows: list[Row], path: str | Path) -> Path:
    """Append rows to a CSV (header written when the file is new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    return path


def markdown_table(rows: list[Row], baseline: str, higher_is_better: bool | None = None) -> str:
    """Markdown table grouping rows by (name, shape, dtype), with each backend's ratio
    against `baseline` measured in the same run (>1 means faster / better than baseline)."""
    lines = ["| name | shape | dtype | backend | median | unit | vs " + baseline + " |",
             "| --- | --- | --- | --- | ---: | --- | ---: |"]
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.name, row.shape, row.dtype), []).append(row)
    for (name, shape, dtype), group in groups.items():
        base = next((r for r in group if r.backend == baseline), None)
        for row in group:
            ratio = ""
            if base is not None and base.median and row.median:
                better_high = higher_is_better if higher_is_better is not None else _higher_is_better(row.unit)
                ratio = f"{(row.median / base.median if better_high else base.median / row.median):.2f}x"
            lines.append(f"| {name} | {shape} | {dtype} | {row.backend} | {row.median:.4g} | {row.unit} | {ratio} |")
    return "\n".join(lines) + "\n"


def _higher_is_better(unit: str) -> bool:
    return unit not in ("ms", "s", "us", "MiB", "GiB")


def row_fields() -> list[str]:
    return [f.name for f in fields(Row)]


def require_device(suite: str, device: str) -> bool:
    """True if `device` is CUDA; a CUDA device without a visible GPU is a one-line error."""
    on_cuda = str(device).startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        from ..errors import FastGPTError
        raise FastGPTError(f"{suite}: device {device!r} requested but no CUDA GPU is visible")
    return on_cuda


def start_suite(suite: str, device: str, sizes: str, size_sets: dict, requested, known,
                what: str = "backend") -> bool | None:
    """Check a suite's request: a known size set, known backend (or variant) names, and a
    CUDA device only where a GPU is visible (each a one-line error otherwise). Returns
    whether the run is on CUDA, or None when the size set needs a GPU this run lacks
    (said in one message: the suite then has nothing to measure)."""
    from ..errors import FastGPTError
    if sizes not in size_sets:
        raise FastGPTError(f"{suite}: unknown sizes {sizes!r} (choose from: {', '.join(size_sets)})")
    unknown = set(requested) - set(known)
    if unknown:
        raise FastGPTError(f"{suite}: unknown {what} {sorted(unknown)[0]!r} (choose from: {', '.join(known)})")
    on_cuda = require_device(suite, device)
    if size_sets[sizes]["device"] == "cuda" and not on_cuda:
        print(f"{suite}: sizes={sizes!r} needs a CUDA GPU; skipped on {device}")
        return None
    return on_cuda


def runnable_backends(suite: str, backends, on_cuda: bool) -> list[str]:
    """The eager/compile/triton backends that can run here, in order: on CPU, compile
    (inductor's C++ build is too slow for a smoke run) and triton without
    TRITON_INTERPRET=1 are skipped with a message."""
    backends = list(backends)
    if not on_cuda:
        if "compile" in backends:
            print(f"{suite}: compile backend skipped on CPU (inductor's C++ build is too slow for a smoke run)")
            backends.remove("compile")
        if "triton" in backends and os.environ.get("TRITON_INTERPRET") != "1":
            print(f"{suite}: triton backend skipped on CPU (set TRITON_INTERPRET=1 before starting Python)")
            backends.remove("triton")
    return backends


def write_results(rows: list[Row], out_dir: str | Path, stem: str, markdown: str) -> None:
    """Append rows to `<stem>.csv` and replace `<stem>.md` atomically with `markdown`,
    headed by the device, date and commit of the run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / f"{stem}.csv")
    header = f"device: {rows[0].device}; date: {rows[0].date}; commit: {rows[0].commit}\n\n" if rows else ""
    target = out_dir / f"{stem}.md"
    tmp = target.with_name(target.name + ".tmp")
    title, _, body = markdown.partition("\n\n")
    tmp.write_text(f"{title}\n\n{header}{body}")
    os.replace(tmp, target)


def suite_main(argv: list[str] | None, suite: str, doc: str, sizes, run: Callable, baseline: str,
               add_arguments: Callable | None = None, run_kwargs: Callable = lambda args: {}) -> int:
    """`python3 -m fastgpt.bench.<suite>`: --device, --sizes, --out plus the suite's own flags;
    prints the ratio table; bad input is one line and exit status 2."""
    import argparse
    import sys

    from ..errors import FastGPTError

    parser = argparse.ArgumentParser(prog=f"python3 -m fastgpt.bench.{suite}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="gpt2" if torch.cuda.is_available() else "tiny", choices=sorted(sizes),
                        help="size set (default: gpt2 with a GPU, else tiny)")
    parser.add_argument("--out", default=None, help=f"folder for {suite}.csv and {suite}.md")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        rows = run(args.device, args.sizes, args.out, **run_kwargs(args))
    except FastGPTError as err:
        print(f"{suite}: error: {err}", file=sys.stderr)
        return 2
    if rows:
        print(markdown_table(rows, baseline=baseline))
    return 0
