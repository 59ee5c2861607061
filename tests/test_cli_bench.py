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
    # fastgpt against the nanoGPT-style contender; the textbook row is fastgpt's own code on CPU
    assert {r["backend"] for r in rows} == {"fastgpt", "nanogpt"}
    for row in rows:
        assert row["unit"] == "tokens/s" and float(row["p20"]) <= float(row["median"]) <= float(row["p80"])
        assert "steps_per_sample=2" in row["extra"] and "compiled=False" in row["extra"]
    text = (tmp_path / "train.md").read_text()
    assert "| train_step | L2-C64 B=2 T=32 | fp32 | nanogpt |" in text and "vs nanogpt" in text
    assert "textbook skipped" in capsys.readouterr().out


def test_bench_cuda_without_gpu_is_one_line_error(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "kernels", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_bench_cpu_sizes_skip_suites_without_a_cpu_case(tmp_path, capsys):
    assert main(["bench", "attention", "--device", "cpu", "--sizes", "cpu", "--out", str(tmp_path)]) == 0
    assert "bench attention: no 'cpu' size set; skipped" in capsys.readouterr().out
    assert not (tmp_path / "attention.csv").exists()


@pytest.mark.parametrize("flags, expected", [([], None), (["--llama-cpp"], ("f32", "f16", "q8_0")),
                                             (["--llama-cpp", "q8_0"], ("q8_0",))])
def test_bench_generate_passes_the_llama_cpp_types_on(monkeypatch, tmp_path, flags, expected):
    from fastgpt.bench import generate as bench_generate
    seen = {}

    def fake_run(device, sizes, out_dir, **options):  # the suite's own run is tested in test_bench_generate
        seen.update(options)
        return []
    monkeypatch.setattr(bench_generate, "run", fake_run)
    assert main(["bench", "generate", "--device", "cpu", "--sizes", "tiny", "--out", str(tmp_path), *flags]) == 0
    assert seen.get("llama_cpp") == expected
