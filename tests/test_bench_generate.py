"""The generation benchmark runs end to end at tiny size (no speed assertions)."""
import csv
import dataclasses

import pytest

pytest.importorskip("transformers")


def test_generation_benchmark_writes_csv_and_markdown(tmp_path):
    from fastgpt.bench.generate import run
    rows = run("cpu", sizes=("tiny",), out_dir=tmp_path, new_tokens=6, prompt_tokens=4, repeats=1,
               dtypes=("float32",), threads=1)
    with open(tmp_path / "generate.csv") as f:
        written = list(csv.DictReader(f))
    assert {(r["backend"], r["dtype"]) for r in written} == {
        ("transformers", "fp32"), ("fastgpt", "fp32"), ("bound (bandwidth)", "fp32")}
    assert len(written) == len(rows) == 3
    assert all(float(r["median"]) > 0 and r["unit"] == "tokens/s" for r in written)
    fastgpt_row = next(r for r in written if r["backend"] == "fastgpt")
    extra = dict(item.split("=", 1) for item in fastgpt_row["extra"].split(";"))
    assert extra["equal_tokens"] == "6/6"
    assert float(extra["ttft_ms"]) > 0 and 0 < float(extra["bound_share"])
    assert extra["cpu"] in ("AMX", "AVX512-BF16", "AVX512", "AVX2") or extra["cpu"]
    markdown = (tmp_path / "generate.md").read_text()
    assert "| transformers | fp32 |" in markdown and "| fastgpt | fp32 |" in markdown
    assert "vs transformers fp32" in markdown and "time to first token" in markdown and "Machine:" in markdown


def test_benchmark_rejects_unknown_modes_and_sizes(tmp_path):
    from fastgpt.bench.generate import run
    from fastgpt.errors import FastGPTError
    with pytest.raises(FastGPTError, match="float8"):
        run("cpu", sizes=("tiny",), out_dir=tmp_path, dtypes=("float8",))
    with pytest.raises(FastGPTError, match="huge"):
        run("cpu", sizes=("huge",), out_dir=tmp_path)


@pytest.mark.parametrize("native_bf16, f16c, faster, expected", [
    (True, True, "bf16", "bf16"), (True, True, "fp16", "fp16"), (True, False, "fp16", "bf16"),
    (False, True, "bf16", "fp16"), (False, False, "fp16", None)])
def test_the_16bit_mode_follows_the_cpu(monkeypatch, native_bf16, f16c, faster, expected):
    """Simulated capabilities and GEMV timings: on AVX2 '16-bit weights' means fp16 (F16C), not
    emulated bf16; where both are native, the faster one in the timing."""
    from fastgpt import native_linear, runtime
    from fastgpt.bench import generate as bench
    from fastgpt.runtime import cpu_capabilities, dtype_name
    monkeypatch.setattr(native_linear, "available", lambda fmt="f32": False)  # PyTorch's kernels decide
    caps = dataclasses.replace(cpu_capabilities(), avx512_bf16=native_bf16, amx=False, f16c=f16c)
    monkeypatch.setattr(runtime, "cpu_capabilities", lambda: caps)
    monkeypatch.setattr(bench, "cpu_capabilities", lambda: caps)
    timed = []
    monkeypatch.setattr(runtime, "_gemv_seconds", lambda dtype: timed.append(dtype) or
                        (1.0 if dtype_name(dtype) == faster else 2.0))
    runtime.fastest_cpu_half_dtype.cache_clear()
    half = bench.half_dtype("cpu")
    runtime.fastest_cpu_half_dtype.cache_clear()
    assert len(timed) == (2 if native_bf16 and f16c else 0)  # a timing only when there is a choice
    assert (dtype_name(half) if half is not None else None) == expected
    assert ("16bit" in bench.default_modes("cpu")) == (expected is not None)
    assert bench.default_modes("cpu")[-2:] == ["int8", "int4"]


def test_the_16bit_mode_is_fp16_on_the_c_kernel():
    from fastgpt import native_linear
    from fastgpt.bench.generate import half_dtype
    if not native_linear.available("f16"):
        pytest.skip("fastgpt's C kernel does not build here")
    import torch
    assert half_dtype("cpu") == torch.float16


def test_demo_sized_model_and_the_16bit_mode_run(tmp_path):
    from fastgpt.bench.generate import half_dtype, run
    if half_dtype("cpu") is None:
        pytest.skip("this CPU has no fast 16-bit format")
    rows = run("cpu", sizes="tiny", out_dir=tmp_path, new_tokens=4, prompt_tokens=4, repeats=1,
               dtypes=("16bit",), threads=1)
    assert {(r.backend, r.dtype) for r in rows} == {("transformers", "fp32"), ("fastgpt", "16bit"),
                                                    ("bound (bandwidth)", "16bit")}


def test_speculative_benchmark_checks_identity_and_reports_acceptance(tmp_path):
    import torch

    from fastgpt.bench.generate import run_speculative
    from fastgpt.model import GPT
    from fastgpt.weights import save_fastgpt
    torch.manual_seed(0)
    target = save_fastgpt(GPT("tiny"), tmp_path / "target")
    rows = run_speculative(str(target), str(target), out_dir=tmp_path, new_tokens=6, ks=(2,), repeats=1,
                           prompts=("Hello", "A B"), threads=1)
    assert [r.backend for r in rows] == ["target alone", "prompt lookup k=4", "draft k=2", "target alone, sampling",
                                         "draft k=2, sampling"]
    draft_row = rows[2]
    assert "acceptance=100.0%" in draft_row.extra and "tokens_equal_plain=all" in draft_row.extra
    assert "| draft k=2 |" in (tmp_path / "speculative.md").read_text()


def test_llama_cpp_types_are_checked_before_anything_runs(tmp_path):
    from fastgpt.bench.generate import run
    from fastgpt.errors import FastGPTError
    with pytest.raises(FastGPTError, match="llama.cpp types: choose from f32, f16, q8_0, got q4_k"):
        run("cpu", sizes=("tiny",), out_dir=tmp_path, dtypes=("float32",), llama_cpp=("q4_k",))


def test_llama_cpp_rows_sit_in_the_same_table(tmp_path):
    """Only where llama-cpp-python is installed (never a CI dependency)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional")
    pytest.importorskip("gguf", reason="the GGUF writer needs gguf")
    from fastgpt.bench.generate import run
    rows = run("cpu", sizes=("tiny",), out_dir=tmp_path, new_tokens=6, prompt_tokens=4, repeats=1,
               dtypes=("float32",), threads=1, llama_cpp=("f32", "q8_0"))
    llama = {r.dtype: r for r in rows if r.backend == "llama.cpp"}
    assert set(llama) == {"f32", "q8_0"}
    extra = dict(item.split("=", 1) for item in llama["f32"].extra.split(";"))
    assert extra["equal_tokens"] == "6/6" and float(extra["ttft_ms"]) > 0 and float(extra["bound_share"]) > 0
    assert extra["llama_cpp_python"]
    assert {r.dtype for r in rows if r.backend == "bound (bandwidth)"} == {"fp32", "gguf f32", "gguf q8_0"}
    assert "| llama.cpp | q8_0 |" in (tmp_path / "generate.md").read_text()
