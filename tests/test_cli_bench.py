"""`fastgpt bench` runs a suite end to end on CPU and writes its CSV and Markdown."""
import csv

import pytest

from fastgpt.bench.common import COLUMNS
from fastgpt.cli import main


def test_bench_train_tiny_writes_csv_and_markdown(tmp_path, capsys):
    assert main(["bench", "train", "--device", "cpu", "--sizes", "tiny", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == COLUMNS
    assert {r["backend"] for r in rows} == {"torch"}  # triton / compile skip on CPU with a message
    assert float(rows[0]["median"]) > 0 and rows[0]["unit"] == "tokens/s"
    assert "| train_step |" in (tmp_path / "train.md").read_text()
    assert "skipped" in capsys.readouterr().out


def test_bench_cuda_without_gpu_is_one_line_error(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "kernels", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
