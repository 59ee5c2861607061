"""Shared test setup.

TRITON_INTERPRET=1 must be set before triton is first imported, so that the
Triton kernels run on CPU tensors (through numpy) when no GPU is present.
"""
import os
from pathlib import Path

import pytest
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()) or 1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPU = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if GPU else "cpu"

requires_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def shared_file(name: str) -> Path:
    """A file of ../shared/data beside the checkout, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        if os.environ.get("CI"):  # CI has ../shared: there a missing file is a failure, not a skip
            pytest.fail(f"{path} not present (CI is set, so the shared data must be there)")
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(autouse=True)
def _seed_and_backend():
    from fastgpt import ops
    torch.manual_seed(0)
    previous = ops.get_backend()
    yield
    ops.set_backend(previous)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (minutes on 2 CPU cores) run only when FASTGPT_SLOW=1."""
    if os.environ.get("FASTGPT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FASTGPT_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def varied_tiny_model(seed: int = 1234, **overrides):
    """A tiny GPT (context 64 unless `overrides` say otherwise, eval mode) whose matrices are
    drawn with std 0.2 instead of GPT-2's 0.02: at the small init a random model repeats one
    token forever, which would make equalities between decoding paths trivially true."""
    from fastgpt.config import preset
    from fastgpt.model import GPT
    torch.manual_seed(seed)
    model = GPT(preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # (the embedding's real rows: its pad rows stay zero)
                (p[:model.config.vocab_size] if p is model.tok_emb.weight else p).normal_(0.0, 0.2)
    return model


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy CPU the OpenMP
    hand-off between threads costs more than the work itself."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _c_kernel_builds():
    """-march values whose build of fastgpt's C kernel this machine can run: native, and on
    x86 also the AVX2 (haswell) and plain-C (x86-64) code paths."""
    import platform

    from fastgpt.runtime import cpu_capabilities
    builds = ["native"]
    if platform.machine() in ("x86_64", "AMD64"):
        caps = cpu_capabilities()
        if caps.avx2 and caps.f16c and caps.avx512:  # (on an AVX2-only CPU, native is the AVX2 path)
            builds.append("haswell")
        builds.append("x86-64")
    return builds


@pytest.fixture(params=_c_kernel_builds())
def c_kernel_build(request, monkeypatch):
    """Runs the test once per code path of fastgpt's C kernel (csrc/cpu_decode.c) that this
    CPU can execute: NativeLinear and the block decode then use that build."""
    from fastgpt import native_build, native_linear
    if native_build.compiler() is None:
        pytest.skip("no C compiler on this machine")
    if request.param != "native":
        library = native_linear.kernel_library(request.param)
        assert library is not None, native_build.unavailable_reason("cpu_decode", request.param)
        monkeypatch.setattr(native_linear, "kernel_library", lambda march="native": library)
        monkeypatch.setattr(native_linear, "_GEMMS", native_linear._Gemms())
    return request.param
