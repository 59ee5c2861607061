"""The reference path needs no Triton: the model tests pass with `import triton` failing.

Triton is installed on Linux only (pyproject), so a macOS or CPU-only install must still
run the model on the PyTorch references. The tests run in a child process whose
`sys.meta_path` refuses every `triton` module, as an interpreter without Triton would.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_BLOCK_TRITON = """
import sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_TRITON + code, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_model_tests_pass_without_triton():
    result = _run("import pytest; sys.exit(pytest.main(sys.argv[1:]))",
                  "-q", "-p", "no:cacheprovider", "tests/test_model.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_forward_and_backward_without_triton_never_import_it():
    result = _run("""
import os
os.environ["TRITON_INTERPRET"] = "1"  # asks for the kernels: the missing Triton must still be survivable
import torch
from fastgpt import ops
from fastgpt.model import GPT
from fastgpt.errors import FastGPTError
model = GPT("tiny")
idx = torch.randint(0, 100, (2, 8))
model(idx, idx).backward()
assert not ops.TRITON_AVAILABLE
assert not any(name == "triton" or name.startswith("triton.") for name in sys.modules), "triton was imported"
try:
    ops.set_backend("triton")
except FastGPTError as err:
    print("refused:", err)
""")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: backend 'triton' needs Triton" in result.stdout
