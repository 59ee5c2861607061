"""Shared checks for the elementwise/row kernels' tests (LayerNorm, bias+GELU).

Errors are measured against the fp64 reference relative to its largest magnitude.
Observed on CPU: fp32 ~2e-7 (summation order), fp16 ~4e-4 (the output's own
rounding, 2^-11); bf16 rounds at 2^-8 (GPU only: the interpreter's bf16 is not trusted).
On an H100, fp32 once reached 1.3e-5 at width 1 (Triton's approximate GPU division,
times rstd = 1/sqrt(eps)); the LayerNorm kernels now multiply by 1/C instead, which is
exact there, so fp32 keeps its 2e-6 on every backend (not yet re-run on a GPU).
"""
import pytest
import torch
from conftest import GPU

from fastgpt.kernels import _custom_ops

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write fails the test."""
    monkeypatch.setattr(_custom_ops, "POISON_OUTPUTS", True)


def assert_close(actual, expected, dtype, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten element?)"
    expected = expected.double()
    scale = expected.abs().max().clamp(min=1.0).item()
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g}"
