"""Smoke run of the kernel benchmark at tiny sizes (the GPU shapes skip on CPU)."""
import pytest
from conftest import DEVICE, INTERPRETER

from fastgpt.bench import kernels
from fastgpt.errors import FastGPTError


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETER, reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_tiny_run_reports_every_case_mode_and_backend(tmp_path):
    rows = kernels.run(DEVICE, "tiny", tmp_path, backends=("eager", "triton"), include_others=False)
    names = {(r.name, r.backend) for r in rows}
    for case in ("layer_norm", "add_layer_norm", "bias_gelu"):
        for mode in ("forward", "backward", "full"):
            for backend in ("eager", "triton"):
                assert (f"{case}.{mode}", backend) in names
                assert (f"{case}.{mode}.bandwidth", backend) in names
    by_key = {(r.name, r.backend): r for r in rows}
    for r in rows:
        if r.unit == "GB/s":
            timing = by_key[(r.name.removesuffix(".bandwidth"), r.backend)]
            nbytes = int(dict(kv.split("=") for kv in r.extra.split(";"))["bytes"])
            assert r.median == pytest.approx(nbytes / (timing.median * 1e-3) / 1e9)
        assert r.median > 0
    assert "| layer_norm.full | 16x64 | fp32 | triton |" in (tmp_path / "kernels.md").read_text()
    assert (tmp_path / "kernels.csv").read_text().count("\n") == len(rows) + 1


def test_gpu_sizes_skip_on_cpu_and_bad_sizes_raise(capsys):
    if DEVICE == "cpu":
        assert kernels.run("cpu", "gpt2", None, include_others=False) == []
        assert "needs a CUDA GPU" in capsys.readouterr().out
    with pytest.raises(FastGPTError, match="sizes"):
        kernels.run(DEVICE, "huge", None)
