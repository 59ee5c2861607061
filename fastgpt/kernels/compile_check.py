"""Compile every Triton kernel for real GPUs without needing one.

Each module of `fastgpt.kernels` may define `compile_specs() -> list[KernelSpec]`:
its @triton.jit kernels with argument types and constexprs at GPT-2 shapes. This
module compiles each spec ahead of time for NVIDIA targets (sm_80 = A100,
sm_90 = H100) with `triton.compile`, then reads off what decides whether a kernel
can be fast: registers per thread, register spills, shared memory, and whether the
tensor-core instructions (`mma` on sm_80, `wgmma` on sm_90) made it into the PTX.

It catches on a CPU-only machine what the interpreter cannot: kernels that do not
compile for a real target, and kernels that spill at the shapes that matter.

Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit
functions with Python); `run_in_subprocess` takes care of that.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import io
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..weights.atomic import replace_file

ARCHES = (80, 90)


@dataclass
class KernelSpec:
    """One kernel instance to compile: `signature` maps every argument name to a Triton
    type ("*fp16", "i32", "fp32", ... or "constexpr"); `constexprs` gives the constexpr values."""
    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class CompileResult:
    module: str
    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    shared_bytes: int | None = None
    mma: bool = False
    wgmma: bool = False
    error: str = ""

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


def discover_specs(broken: list[CompileResult] | None = None) -> list[tuple[str, KernelSpec]]:
    """(module name, spec) for every module of fastgpt.kernels that defines compile_specs().
    A module whose import or compile_specs() fails is appended to `broken` (or raises)."""
    from fastgpt import kernels
    found = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "compile_check":
            continue
        try:
            module = importlib.import_module(f"fastgpt.kernels.{info.name}")
            if callable(getattr(module, "compile_specs", None)):
                found.extend((info.name, spec) for spec in module.compile_specs())
        except Exception as err:
            if broken is None:
                raise
            error = f"{type(err).__name__}: {err}"[:200]
            broken.append(CompileResult(info.name, "compile_specs()", 0, 0, 0, error=error))
    return found


def _ast_source(spec: KernelSpec):
    """An ASTSource for the spec. Constexprs are keyed by argument-index tuples, the form
    both Triton 3.6 and 3.9 accept; each constexpr also appears in the signature."""
    from triton.compiler import ASTSource
    fn = spec.fn
    arg_names = list(fn.arg_names)
    unknown = set(spec.signature) - set(arg_names)
    missing = set(arg_names) - set(spec.signature) - set(spec.constexprs)
    if unknown or missing:
        raise ValueError(f"signature does not match {fn.__name__}({', '.join(arg_names)}): "
                         f"unknown {sorted(unknown)}, missing {sorted(missing)}")
    signature = {name: "constexpr" if name in spec.constexprs else spec.signature[name] for name in arg_names}
    constexprs = {(arg_names.index(name),): value for name, value in spec.constexprs.items()}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs)


def _triton_bin(tool: str) -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from `ptxas -v`, using Triton's bundled ptxas (the newer
    one first: its PTX version must be at least the one Triton emitted)."""
    candidates = [_triton_bin("ptxas-blackwell"), _triton_bin("ptxas")]
    if arch < 90:  # Triton itself assembles sm_8x with the older ptxas
        candidates.reverse()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        for ptxas in candidates:
            if not ptxas.exists():
                continue
            run = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                return _parse_ptxas(run.stdout + run.stderr)
    return {}


def _parse_ptxas(log: str) -> dict:
    out = {}
    if m := re.search(r"Used (\d+) registers", log):
        out["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    return out


def compile_one(module: str, spec: KernelSpec, arch: int) -> CompileResult:
    """Compile one spec for sm_<arch>; errors are recorded, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    result = CompileResult(module, spec.name, arch, spec.num_warps, spec.num_stages)
    log = io.StringIO()
    try:
        with _ptxas_log_printed(), contextlib.redirect_stdout(log):
            compiled = triton.compile(_ast_source(spec), target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as err:  # a kernel that does not compile is exactly what we report
        message = str(err).strip().splitlines()
        result.error = f"{type(err).__name__}: {message[0] if message else ''}"[:200]
        return result
    ptx = compiled.asm["ptx"]
    result.shared_bytes = int(getattr(compiled.metadata, "shared", 0) or 0)
    result.wgmma = bool(re.search(r"\bwgmma\.", ptx))
    result.mma = bool(re.search(r"\bmma\.sync", ptx)) or result.wgmma
    # Prefer the log of the ptxas run that built this very cubin (same flags as Triton's);
    # re-assemble the PTX ourselves only where this Triton cannot print that log.
    usage = _parse_ptxas(log.getvalue()) or _ptxas_report(ptx, arch)
    for key, value in usage.items():
        setattr(result, key, value)
    return result


@contextlib.contextmanager
def _ptxas_log_printed():
    """Make Triton recompile (no cache hit) and print its ptxas -v log, then restore."""
    from triton import knobs
    saved = []
    for group, name in ((knobs.compilation, "always_compile"), (knobs.nvidia, "dump_ptxas_log")):
        if hasattr(group, name):
            saved.append((group, name, getattr(group, name)))
            setattr(group, name, True)
    try:
        yield
    finally:
        for group, name, value in saved:
            setattr(group, name, value)


def check(arches=ARCHES, only: list[str] | None = None) -> list[CompileResult]:
    """Compile every discovered spec for each arch; with `only`, just the specs whose name
    contains one of those strings."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (use run_in_subprocess)")
    results: list[CompileResult] = []
    for module, spec in discover_specs(broken=results):
        if only and not any(text in spec.name for text in only):
            continue
        for arch in arches:
            results.append(compile_one(module, spec, arch))
    return results


def markdown_report(results: list[CompileResult], command: str = "") -> str:
    import triton
    lines = ["# Compile-only check of the Triton kernels",
             "",
             f"- date: {datetime.date.today().isoformat()}",
             f"- triton: {triton.__version__}",
             f"- command: `{command or 'python3 -m fastgpt compile-check'}`",
             "- registers and spills: the `ptxas -v` log of the ptxas run that built each cubin; "
             "shared memory: Triton's kernel metadata (bytes); mma: tensor-core `mma.sync`/`wgmma` in the PTX",
             "",
             "| module | kernel | sm | warps | stages | registers | spill st/ld (B) | shared (B) | mma | wgmma "
             "| status |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in results:
        spill = "?" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        status = f"ERROR {r.error}" if r.error else ("SPILLS" if r.spills else "ok")
        regs = "?" if r.registers is None else str(r.registers)
        shared = "?" if r.shared_bytes is None else str(r.shared_bytes)
        lines.append(f"| {r.module} | {r.name} | {r.arch} | {r.num_warps} | {r.num_stages} | {regs} | {spill} | "
                     f"{shared} | {'yes' if r.mma else 'no'} | {'yes' if r.wgmma else 'no'} | {status} |")
    failed = [r for r in results if r.error or r.spills]
    lines += ["", f"{len(results)} compilations, {len(failed)} failing (errors or spills)."]
    return "\n".join(lines) + "\n"


def exit_code(results: list[CompileResult]) -> int:
    """Non-zero when any kernel failed to compile or spills registers."""
    return 1 if any(r.error or r.spills for r in results) else 0


def run_in_subprocess(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m fastgpt.kernels.compile_check ARGS` with TRITON_INTERPRET removed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "fastgpt.kernels.compile_check", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=root)


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHES))
    parser.add_argument("--only", nargs="+", default=None, help="only kernels whose name contains one of these")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    from ..errors import FastGPTError
    command = "python3 -m fastgpt.kernels.compile_check " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        return report(args.arch, args.only, args.out, command.strip())
    except FastGPTError as err:
        print(f"compile_check: error: {err}", file=sys.stderr)
        return 2


def report(arches, only, out, command) -> int:
    """Compile, print the Markdown table, write it to `out` (atomically) if given; the exit code."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the historical default; silences 3.9's warning
    results = check(arches, only)
    if only and not results:
        from ..errors import FastGPTError
        raise FastGPTError(f"--only {' '.join(only)}: no kernel name contains any of these")
    text = markdown_report(results, command)
    print(text, end="")
    if out:
        try:
            replace_file(out, lambda tmp: tmp.write_text(text))
        except OSError as err:
            from ..errors import FastGPTError
            raise FastGPTError(f"--out {out}: cannot write the report ({err.strerror or err})") from None
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
