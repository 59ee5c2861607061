"""The compile-only check: real sm_80/sm_90 builds of the kernels, no GPU needed.

Compilation runs in a subprocess with TRITON_INTERPRET removed, because the
interpreter replaces @triton.jit functions with Python.
"""
import importlib
import pkgutil
import re

import pytest

from fastgpt import kernels
from fastgpt.kernels.compile_check import (
    CompileResult,
    _parse_ptxas,
    discover_specs,
    exit_code,
    markdown_report,
    run_in_subprocess,
)


def _kernel_modules() -> list[str]:
    """The modules of fastgpt.kernels that define @triton.jit entry points (named _*_kernel)."""
    names = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"fastgpt.kernels.{info.name}")
        if any(re.fullmatch(r"_\w+_kernel", name) for name in vars(module)):
            names.append(info.name)
    return sorted(names)


KERNEL_MODULES = _kernel_modules()
MATMUL_KERNELS = ("attention_fwd", "attention_bwd")  # tl.dot: tensor cores expected


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    """`fastgpt compile-check --arch 80 90`: every spec of every module (minutes on 2 CPU cores)."""
    specs = discover_specs()
    done = run_in_subprocess(["--arch", "80", "90"], timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| module") and not line.startswith("| ---")]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (module, spec.name, arch) for module, spec in specs for arch in ("80", "90"))
    assert {r[0] for r in rows} == set(KERNEL_MODULES)
    for module, name, arch, _warps, _stages, regs, spills, _shared, mma, wgmma, status in rows:
        row = f"{module} {name} sm_{arch}"
        assert status == "ok" and spills == "0/0", row
        assert 0 < int(regs) <= 255, row
        if name.startswith(MATMUL_KERNELS):
            assert mma == "yes" and wgmma == ("yes" if arch == "90" else "no"), row
        else:
            assert mma == "no" and wgmma == "no", row  # elementwise/row kernels: no matmul
    assert "triton:" in done.stdout and f"{2 * len(specs)} compilations, 0 failing" in done.stdout


def test_cli_reports_unknown_filter_as_one_line_error():
    done = run_in_subprocess(["--arch", "90", "--only", "no-such-kernel"], timeout=300)
    assert done.returncode == 2
    assert "no-such-kernel" in done.stderr and "Traceback" not in done.stderr


def test_cli_rejects_a_bad_arch(capsys):
    from fastgpt.cli import main
    assert main(["compile-check", "--arch", "7"]) == 2
    assert "--arch 7" in capsys.readouterr().err


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 28 bytes spill stores, 32 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 32 bytes cumulative stack size\n")
    assert _parse_ptxas(log) == {"registers": 255, "spill_stores": 28, "spill_loads": 32}
    assert _parse_ptxas("") == {}


def test_spills_and_errors_fail_the_check():
    clean = CompileResult("m", "k", 90, 4, 3, registers=40, spill_stores=0, spill_loads=0, shared_bytes=0)
    spilling = CompileResult("m", "k2", 90, 4, 3, registers=255, spill_stores=8, spill_loads=8, shared_bytes=0)
    broken = CompileResult("m", "k3", 80, 4, 3, error="CompilationError: boom")
    assert exit_code([clean]) == 0
    assert exit_code([clean, spilling]) == 1
    assert exit_code([clean, broken]) == 1
    table = markdown_report([clean, spilling, broken], "cmd")
    assert "| SPILLS |" in table and "ERROR CompilationError: boom" in table and "3 compilations, 2 failing" in table


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_compile_specs_cover_every_kernel_of_the_module(module_name):
    """Each @triton.jit entry point (named *_kernel) appears in compile_specs()."""
    module = importlib.import_module(f"fastgpt.kernels.{module_name}")
    kernels_here = {name for name in vars(module) if re.fullmatch(r"_\w+_kernel", name)}
    covered = {spec.fn.__name__ if hasattr(spec.fn, "__name__") else spec.fn.fn.__name__
               for spec in module.compile_specs()}
    assert kernels_here <= covered, kernels_here - covered


def test_every_kernel_module_is_checked():
    """The modules the check discovers are exactly those with kernels (none forgotten)."""
    assert {"attention", "cross_entropy", "decode_attention", "gelu", "layernorm"} <= set(KERNEL_MODULES)
    assert {module for module, _ in discover_specs()} == set(KERNEL_MODULES)
