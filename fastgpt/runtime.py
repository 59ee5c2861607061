"""The one device / dtype / CPU resolver: every command asks here, never decides on its own.

Why one module: what runs fast depends on the machine at hand. A GPU wants bf16; a CPU
with AVX512-BF16 or AMX computes bf16 natively, but an AVX2-only CPU runs bf16 matmuls
about 100x slower than fp32 (measured on a 2-core EPYC), while its F16C makes fp16
weights cheap to read. So dtypes and thread counts are chosen here, at run time, from the
capabilities this process sees, not from one machine's measurements.

Dtype names: the short forms `fp32`, `bf16`, `fp16` are canonical (printed everywhere);
`float32`, `bfloat16`, `float16` (torch's names) are accepted as well.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FastGPTError

CANONICAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
# for argparse `choices=`: "auto" plus both spellings
DTYPE_CHOICES = ("auto", *CANONICAL_DTYPES, "float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------- the CPU
@dataclass(frozen=True)
class CpuCapabilities:
    """What this CPU can do, read once from torch and /proc/cpuinfo."""
    model: str            # e.g. "AMD EPYC 9554 64-Core Processor"
    isa: str              # torch's view: "AVX512", "AVX2", "DEFAULT", ...
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    avx512_vnni: bool
    amx: bool
    f16c: bool

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512-BF16 or AMX): only then is bf16 faster than fp32."""
        return self.avx512_bf16 or self.amx

    @property
    def level(self) -> str:
        """The capability class that decides dtypes: AMX > AVX512-BF16 > AVX512 > AVX2 > baseline."""
        if self.amx:
            return "AMX"
        if self.avx512_bf16:
            return "AVX512-BF16"
        if self.avx512:
            return "AVX512"
        if self.avx2:
            return "AVX2"
        return self.isa or "baseline"

    def describe(self) -> str:
        return f"{self.model} ({self.level})"


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> CpuCapabilities:
    text = _cpuinfo_text()
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        isa = ""
    return CpuCapabilities(
        model=model or (os.uname().machine if hasattr(os, "uname") else "unknown CPU"),
        isa=isa,
        avx2="avx2" in flags or isa.startswith(("AVX2", "AVX512")),
        avx512="avx512f" in flags or isa.startswith("AVX512"),
        avx512_bf16="avx512_bf16" in flags,
        avx512_vnni="avx512_vnni" in flags,
        amx="amx_bf16" in flags or "amx_tile" in flags,
        f16c="f16c" in flags,
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    return cpu_capabilities().native_bf16


def best_time(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one warm-up call (first
    touch of memory, thread pool start): for start-up timings that choose a kernel."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gemv_seconds(dtype: torch.dtype, rows: int = 16384, cols: int = 2048) -> float:
    """Best time of a one-row product with a (rows, cols) matrix of `dtype` (64 MB in 16
    bits: beyond the caches, as decoding meets its weights)."""
    matrix, vector = torch.randn(rows, cols).to(dtype), torch.randn(1, cols).to(dtype)
    return best_time(lambda: torch.nn.functional.linear(vector, matrix))


@functools.lru_cache(maxsize=1)
def fastest_cpu_half_dtype() -> torch.dtype | None:
    """The 16-bit weight format this CPU decodes one sequence fastest with, or None when it
    has neither (no bf16 instructions, no F16C). With both, they are timed once per
    process: having bf16 instructions does not make a bf16 GEMV fast (an AVX512-BF16 EPYC,
    torch 2.13, read fp16 weights at 23 GB/s and bf16 ones at 12), and the reverse may hold
    elsewhere. Batch-1 decoding only: the same EPYC multiplied 16 rows by an fp16 matrix 7x
    slower than by a bf16 one (it has no fp16 arithmetic), so prefills and batches want bf16."""
    caps = cpu_capabilities()
    candidates = [dtype for dtype, usable in ((torch.bfloat16, caps.native_bf16), (torch.float16, caps.f16c))
                  if usable]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    with torch.inference_mode():
        seconds = {dtype: _gemv_seconds(dtype) for dtype in candidates}
    return min(seconds, key=seconds.get)


def available_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use: SMT siblings count once.
    Matmul threads beyond the physical cores only fight over the same FPUs."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return available_cpus()
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topology / "core_id").read_text().strip()
            package = (topology / "physical_package_id").read_text().strip()
        except OSError:
            return len(allowed)
        cores.add((package, core))
    return max(1, len(cores))


def default_threads() -> int:
    """Threads for torch's CPU kernels: the physical cores this process may use, unless the
    user said otherwise through OMP_NUM_THREADS (which then wins)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return physical_cores()


def set_threads(threads: int | None) -> int:
    """Apply a thread count (None or 0: `default_threads()`); returns the count in force."""
    n = threads or default_threads()
    if n < 1:
        raise FastGPTError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def measured_threads(threads: int | None = None, size: int = 1024, seconds: float = 0.01) -> int:
    """`threads` (default: `default_threads()`), unless one thread does the same GEMV faster.

    Batch-1 decoding is a chain of small matmuls that every thread must join; on a machine
    busy with other jobs a thread that waits for its core stalls all the others (2 threads
    measured ~4.5x slower than 1 there). So instead of a fixed 1, time a GEMV of the
    size decoding runs (a 4 MB fp32 matrix) with both counts, ~`seconds` each, and fall back
    to 1 thread only when it is faster (by 10%). Sets and returns the count in force.
    """
    n = threads or default_threads()
    if n <= 1:
        return set_threads(1)
    matrix, vector = torch.randn(size, size), torch.randn(1, size)

    def rate(count: int) -> float:
        torch.set_num_threads(count)
        vector @ matrix  # warm-up: the thread pool resizes
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            vector @ matrix
            calls += 1
        return calls / (time.perf_counter() - start)

    many, one = rate(n), rate(1)
    return set_threads(1 if one > 1.1 * many else n)


# ---------------------------------------------------------------------------- devices
def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None): the first CUDA GPU when there is one, else the CPU. 'cuda' gets an
    explicit index, since `torch.cuda.set_device` and device meshes need one."""
    if isinstance(name, torch.device):
        device = name
    elif name in (None, "", "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise FastGPTError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastGPTError(f"--device {name}: no CUDA GPU is visible to this process")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


# ---------------------------------------------------------------------------- dtypes
def canonical_dtype_name(name: str) -> str:
    """'float32' -> 'fp32', 'bf16' -> 'bf16', 'auto' -> 'auto'; anything else is a one-line error."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key != "auto" and key not in CANONICAL_DTYPES:
        raise FastGPTError(f"--dtype {name!r}: unknown dtype (choose from auto, fp32, bf16, fp16)")
    return key


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical short name of a torch dtype (fp32 / bf16 / fp16; other dtypes: torch's name)."""
    for name, value in CANONICAL_DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str | torch.dtype, device: torch.device, purpose: str = "train",
                  warn: bool = True) -> torch.dtype:
    """The compute dtype for `device`.

    'auto' for training (autocast dtype): bf16 on GPUs that have it, fp16 on older GPUs;
    on CPUs bf16 only where the CPU computes it natively, else fp32.
    'auto' for inference (weight dtype): bf16 on GPUs; on CPUs bf16 where native, else fp32.
    (Not fp16 on CPUs: on PyTorch's kernels, without fp16 arithmetic, a prompt's prefill or
    a served batch multiplies fp16 matrices 4-9x slower than bf16 ones; fastgpt's C kernel
    widens either to fp32, see `fastgpt.native_linear`.)
    An explicit bf16 on a CPU without bf16 instructions runs, after a one-line warning
    (unless `warn` is False: the caller knows its bf16 weights are widened to fp32, as
    fastgpt's C decoding kernel does).
    """
    if isinstance(name, torch.dtype):
        name = dtype_name(name)
    key = canonical_dtype_name(name)
    if purpose not in ("train", "inference"):
        raise ValueError(f"purpose must be 'train' or 'inference', got {purpose!r}")
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    dtype = CANONICAL_DTYPES[key]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FastGPTError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if warn and dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        warn_slow_bf16()
    return dtype


@functools.lru_cache(maxsize=1)
def warn_slow_bf16() -> None:
    """Printed once per process: bf16 on a CPU without bf16 instructions is emulated."""
    caps = cpu_capabilities()
    print(f"fastgpt: warning: bf16 on {caps.describe()}, which has no bf16 instructions: matmuls are "
          "emulated and can be ~100x slower than fp32 (use --dtype fp32, or fp16 weights for generation)",
          file=sys.stderr)


def autocast_factory(device: torch.device, dtype: torch.dtype):
    """A zero-argument context-manager factory: autocast to `dtype`, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def describe_machine(device: torch.device) -> str:
    """One line naming the hardware, for logs and benchmark records."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_capabilities().describe()}, {physical_cores()} cores available"

