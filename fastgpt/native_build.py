"""Compile fastgpt's C kernels (`fastgpt/csrc/`) for the CPU at hand, once, and load them.

The CPU kernels are plain C compiled with `-march=native`: the vector width and the
instructions that widen int8 / fp16 / bf16 to float32 are those of the machine that runs
them, which no prebuilt wheel can know. The library is built on first use with the system
C compiler (`$CC`, else `cc`, `gcc` or `clang`) and cached under
`$FASTGPT_CACHE/native/` (default ~/.cache/fastgpt), keyed by the source, the flags, the
compiler's version and the CPU's flags, so a changed source or a different CPU rebuilds.
Writing is atomic (temporary file, then rename), so concurrent first runs cannot load half
a library. Without a compiler, or when the build fails, `load_library` returns None with
the reason in `unavailable_reason`, and callers take their PyTorch path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .runtime import cpu_capabilities
from .weights.atomic import replace_file
from .weights.download import default_cache_dir

SOURCE_DIR = Path(__file__).parent / "csrc"
# -fopenmp: parallel loops on the OpenMP runtime torch has already loaded (libgomp), one pool
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-Wno-psabi")  # and -march (native unless a test asks otherwise)
LIBRARIES = ("-lm",)  # after the source, where linkers that drop unneeded libraries look for them
_failures: dict[tuple[str, str], str] = {}


def compiler() -> str | None:
    """The C compiler to build with: $CC, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((path for path in map(shutil.which, ("cc", "gcc", "clang")) if path), None)


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(name: str, cc: str, march: str = "native") -> Path:
    """Where the build of csrc/<name>.c for this source, compiler, -march and CPU is cached."""
    caps = cpu_capabilities()
    key = "\n".join([(SOURCE_DIR / f"{name}.c").read_text(), " ".join(FLAGS + LIBRARIES), march, cc,
                     _compiler_version(cc),
                     platform.machine(), caps.model, caps.isa, str(sorted(vars(caps).items()))])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_dir() / "native" / f"{name}-{digest}.so"


def _build(name: str, cc: str, march: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():  # (a person waiting; logs and one-line error messages stay as they are)
        print(f"fastgpt: compiling csrc/{name}.c for this CPU with {Path(cc).name} (once; cached in "
              f"{target.parent})", file=sys.stderr)

    def compile_to(tmp: Path) -> None:
        command = [cc, *FLAGS, f"-march={march}", str(SOURCE_DIR / f"{name}.c"), "-o", str(tmp), *LIBRARIES]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            first_error = next((line for line in result.stderr.splitlines() if "error" in line),
                               result.stderr.strip()[:200])
            raise RuntimeError(f"{cc} failed on csrc/{name}.c: {first_error}")

    replace_file(target, compile_to)


@functools.lru_cache(maxsize=None)
def load_library(name: str, march: str = "native") -> ctypes.CDLL | None:
    """csrc/<name>.c compiled for this CPU and loaded, or None (see `unavailable_reason`).
    `march`: another -march, so that tests can run the AVX2 and plain-C code paths on an
    AVX-512 machine (the CPU must support what it names)."""
    if platform.system() != "Linux":
        _failures[name, march] = f"native CPU kernels are built on Linux only, not {platform.system()}"
        return None
    cc = compiler()
    if cc is None:
        _failures[name, march] = "no C compiler found (set $CC, or install gcc)"
        return None
    torch.get_num_threads()  # torch (and its OpenMP runtime) is loaded first, so the library shares it
    target = library_path(name, cc, march)
    try:
        if not target.exists():
            _build(name, cc, march, target)
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _failures[name, march] = str(error).splitlines()[0]
        return None


def unavailable_reason(name: str, march: str = "native") -> str | None:
    """Why `load_library(name, march)` gave None (None when it has not failed)."""
    return _failures.get((name, march))
