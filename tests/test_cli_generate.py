"""`fastgpt generate` and `fastgpt chat` end to end."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import varied_tiny_model

from fastgpt.cli import main
from fastgpt.model import GPT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from fastgpt.weights import save_fastgpt
    return save_fastgpt(varied_tiny_model(seed=0), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def alpaca_dir(tmp_path_factory):
    from fastgpt.weights import save_fastgpt
    return save_fastgpt(varied_tiny_model(seed=0), tmp_path_factory.mktemp("tiny_alpaca"),
                        metadata={"template": "alpaca"})


def run_cli(*args, stdin=""):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep the caller's
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastgpt", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_generate_streams_text_and_reports_speed(model_dir):
    result = run_cli("generate", "--model", str(model_dir), "--prompt", "Once upon a time",
                     "--max-new-tokens", "5", "--seed", "0", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time")
    assert len(result.stdout) > len("Once upon a time\n")
    assert "tokens/s" in result.stderr and "time to first token" in result.stderr


def test_generate_writes_each_piece_as_it_comes(model_dir, monkeypatch, capsys):
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    code = main(["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "12",
                 "--temperature", "0", "--threads", "1"])
    assert code == 0
    pieces = [w for w in writes[1:] if w and w != "\n"]
    assert len(pieces) >= 6  # streamed token by token, not printed once at the end
    assert "tokens/s" in capsys.readouterr().err


def test_greedy_cli_is_deterministic_and_cache_agnostic(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "The", "--max-new-tokens", "10",
            "--temperature", "0", "--threads", "1"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main(args + ["--no-cache"]) == 0
    assert capsys.readouterr().out == cached


@pytest.mark.parametrize("flags, word", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "-3"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "-2"], "--max-new-tokens"),
])
def test_bad_sampling_arguments_exit_2_with_one_line(model_dir, capsys, flags, word):
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err


def test_bad_argument_in_a_subprocess(model_dir):
    result = run_cli("generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["fastgpt generate: error: --top-p must be in (0, 1], got 2.0"]


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_chat_answers_each_piped_line(model_dir):
    result = run_cli("chat", "--model", str(model_dir), "--max-new-tokens", "4", "--temperature", "0",
                     "--threads", "1", stdin="Hello there\n/reset\nHow are you?\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.split("\n") if line.strip()]
    assert len(answers) >= 2  # one streamed answer per user line
    assert result.stderr.count("stopped at") == 2  # one speed line per answer
    assert "conversation reset" in result.stderr


def test_chat_uses_the_template_from_metadata(alpaca_dir, capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a colour.\n"))
    assert main(["chat", "--model", str(alpaca_dir), "--max-new-tokens", "3", "--temperature", "0",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "prompt template 'alpaca'" in captured.err
    from fastgpt.finetune.templates import format_prompt
    from fastgpt.tokenizer import Tokenizer
    n_prompt = len(Tokenizer().encode(format_prompt("alpaca", "Name a colour.")))
    assert f"prompt {n_prompt} tokens" in captured.err  # the user's line went in wrapped in the template


# ---------------------------------------------------------------------- speed options
def test_draft_model_keeps_greedy_text_and_reports_acceptance(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "The", "--max-new-tokens", "12",
            "--temperature", "0", "--threads", "1"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft", str(model_dir), "--speculate-k", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "speculation:" in captured.err and "(100.0%)" in captured.err  # the draft is the model itself
    assert main(args + ["--prompt-lookup"]) == 0
    assert capsys.readouterr().out == plain


def test_draft_with_another_vocabulary_is_one_line(model_dir, tmp_path, capsys):
    from fastgpt.config import preset
    from fastgpt.weights import save_fastgpt
    other = save_fastgpt(GPT(preset("tiny", vocab_size=300)), tmp_path / "small_vocab")
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--draft", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocabulary has 300 tokens" in err


@pytest.mark.parametrize("flags, word", [
    (["--dtype", "float8"], "--dtype"),
    (["--speculate-k", "0"], "--speculate-k"),
    (["--threads", "0"], "--threads"),
    (["--prompt-lookup", "--draft", "x"], "--prompt-lookup"),
])
def test_bad_speed_arguments_exit_2_with_one_line(model_dir, capsys, flags, word):
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err


@pytest.mark.parametrize("c_kernel", [False, True])
def test_dtype_names_both_spellings_and_the_bf16_warning_on_a_cpu_without_it(model_dir, capsys, monkeypatch,
                                                                              c_kernel):
    """Simulated capabilities: an AVX2-only CPU gets the one-line bf16 warning, a bf16 CPU does not;
    nor does any CPU when fastgpt's C kernel takes the bf16 weights (it widens them to fp32)."""
    import dataclasses

    from fastgpt import native_linear, runtime
    if c_kernel and not native_linear.available("bf16"):
        pytest.skip("fastgpt's C kernel does not build here")
    from fastgpt import streaming_linear
    real_available = native_linear.available

    def with_or_without(fmt="f32"):
        return c_kernel and real_available(fmt)
    monkeypatch.setattr(native_linear, "available", with_or_without)
    monkeypatch.setattr(streaming_linear, "available", with_or_without)
    real = runtime.cpu_capabilities()
    args = ["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "2", "--threads", "1",
            "--temperature", "0"]
    for caps, warned in [(dataclasses.replace(real, avx512_bf16=False, amx=False, avx512=False), not c_kernel),
                         (dataclasses.replace(real, avx512_bf16=True), False)]:
        monkeypatch.setattr(runtime, "cpu_capabilities", lambda caps=caps: caps)
        runtime.warn_slow_bf16.cache_clear()
        assert main(args + ["--dtype", "bf16"]) == 0
        err = capsys.readouterr().err
        assert ("no bf16 instructions" in err) == warned
        assert main(args + ["--dtype", "float32"]) == 0  # torch's name, accepted
        assert "no bf16 instructions" not in capsys.readouterr().err
    runtime.warn_slow_bf16.cache_clear()


def test_measured_threads_sets_what_it_returns():
    from fastgpt.runtime import measured_threads
    previous = torch.get_num_threads()
    try:
        assert measured_threads(1) == 1 == torch.get_num_threads()
        n = measured_threads(2, size=256, seconds=0.005)
        assert n in (1, 2) and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(previous)
