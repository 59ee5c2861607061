"""The generation benchmark runs end to end at tiny size (no speed assertions)."""
import csv

import pytest

pytest.importorskip("transformers")


def test_generation_benchmark_writes_csv_and_markdown(tmp_path):
    from fastgpt.bench.generate import run
    rows = run("cpu", sizes=("tiny",), out_dir=tmp_path, new_tokens=6, prompt_tokens=4, repeats=1,
               dtypes=("float32",), threads=1)
    with open(tmp_path / "generate.csv") as f:
        written = list(csv.DictReader(f))
    assert {(r["backend"], r["dtype"]) for r in written} == {
        ("transformers", "float32"), ("fastgpt", "float32"), ("bound (bandwidth)", "float32")}
    assert len(written) == len(rows) == 3
    assert all(float(r["median"]) > 0 and r["unit"] == "tokens/s" for r in written)
    fastgpt_row = next(r for r in written if r["backend"] == "fastgpt")
    assert "first_6_of_6_tokens_equal_transformers_fp32" in fastgpt_row["extra"]
    markdown = (tmp_path / "generate.md").read_text()
    assert "| transformers | float32 |" in markdown and "| fastgpt | float32 |" in markdown
    assert "vs transformers float32" in markdown


def test_benchmark_rejects_unknown_dtype(tmp_path):
    from fastgpt.bench.generate import run
    from fastgpt.errors import FastGPTError
    with pytest.raises(FastGPTError, match="float8"):
        run("cpu", sizes=("tiny",), out_dir=tmp_path, dtypes=("float8",))
