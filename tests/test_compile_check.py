"""The compile-only check: real sm_80/sm_90 builds of the kernels, no GPU needed.

Compilation runs in a subprocess with TRITON_INTERPRET removed, because the
interpreter replaces @triton.jit functions with Python.
"""
import importlib
import re

import pytest

from fastgpt.kernels.compile_check import CompileResult, _parse_ptxas, exit_code, markdown_report, run_in_subprocess

MY_SPECS = ["layer_norm_fwd_add[C=768,fp16]", "layer_norm_bwd_add[C=768,fp16]",
            "bias_gelu_fwd[C=3072,fp16]", "bias_gelu_bwd[C=3072,fp16]"]


def test_layernorm_and_gelu_compile_for_sm80_and_sm90_without_spills():
    done = run_in_subprocess(["--arch", "80", "90", "--only", *MY_SPECS], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| layernorm") or line.startswith("| gelu")]
    assert len(rows) == 2 * len(MY_SPECS), done.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        module, name, arch, warps, stages, regs, spills, shared, mma, wgmma, status = cells
        assert arch in ("80", "90") and status == "ok", row
        assert 0 < int(regs) <= 255 and spills == "0/0", row
        assert mma == "no" and wgmma == "no", row  # elementwise/row kernels: no matmul
    assert "triton:" in done.stdout and f"{2 * len(MY_SPECS)} compilations, 0 failing" in done.stdout


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


@pytest.mark.parametrize("module_name", ["layernorm", "gelu"])
def test_compile_specs_cover_every_kernel_of_the_module(module_name):
    """Each @triton.jit entry point (named *_kernel) appears in compile_specs()."""
    module = importlib.import_module(f"fastgpt.kernels.{module_name}")
    kernels = {name for name in vars(module) if re.fullmatch(r"_\w+_kernel", name)}
    assert kernels
    covered = {spec.fn.__name__ if hasattr(spec.fn, "__name__") else spec.fn.fn.__name__
               for spec in module.compile_specs()}
    assert kernels <= covered, kernels - covered
