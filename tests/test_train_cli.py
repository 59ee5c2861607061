"""`fastgpt pretrain` from the command line: help, bad input as one line with exit 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import as_flags, tiny_options, word_text

from fastgpt.cli import main

REPO = Path(__file__).resolve().parents[1]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fastgpt pretrain: error: ")
    return err


def test_help_lists_every_option(capsys):
    from fastgpt.train.config import option_names
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for name in option_names():
        assert "--" + name.replace("_", "-") in out
    for extra in ("--demo", "--config", "--resume", "--plot"):
        assert extra in out


@pytest.mark.parametrize("case, expected", [
    ("missing", "--text: no such file"),
    ("empty", "no text to train on"),
    ("short", "fewer than the context length + 1"),
    ("indivisible", "--tokens-per-step 1000 is not a multiple of micro_batch x context x processes"),
    ("unknown_key", "unknown key 'n_layers'"),
    ("no_data", "no training data"),
    ("bad_init", "--init must be gpt2 or pytorch, got 'xavier'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, expected):
    text = word_text(tmp_path / "words.txt")
    out = tmp_path / "run"
    options = tiny_options(text, out)
    extra = []
    if case == "missing":
        options["text"] = str(tmp_path / "nope.txt")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("  \n")
        options["text"] = str(tmp_path / "empty.txt")
    elif case == "short":
        options["text"] = str(word_text(tmp_path / "short.txt", n_words=100))  # val split: 10 tokens
        options["context_length"] = 64
    elif case == "indivisible":
        options["tokens_per_step"] = 1000
    elif case == "unknown_key":
        cfg = tmp_path / "run.toml"
        cfg.write_text("[model]\nn_layers = 3\n")
        extra = ["--config", str(cfg)]
    elif case == "no_data":
        del options["text"]
    elif case == "bad_init":
        options["init"] = "xavier"
    err = _error(capsys, ["pretrain", *as_flags(options), *extra])
    assert expected in err, err
    if case == "unknown_key":
        assert str(tmp_path / "run.toml") in err
    assert not out.exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "run", max_steps=1)
    assert main(["pretrain", *as_flags(options)]) == 0
    capsys.readouterr()
    state = (tmp_path / "run" / "ckpt_000001" / "state.json").read_bytes()
    err = _error(capsys, ["pretrain", *as_flags(options)])
    assert "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "ckpt_000001" / "state.json").read_bytes() == state


def test_plot_redraws_loss_curve(tmp_path, capsys):
    text = word_text(tmp_path / "words.txt")
    assert main(["pretrain", *as_flags(tiny_options(text, tmp_path / "run", max_steps=3))]) == 0
    assert not (tmp_path / "run" / "loss.png").exists()  # tiny_options turns the end-of-run plot off
    capsys.readouterr()
    assert main(["pretrain", "--plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    _error(capsys, ["pretrain", "--plot", str(tmp_path / "nothing")])


def test_exit_status_2_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastgpt", "pretrain", "--text", str(tmp_path / "missing.txt")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.txt" in proc.stderr


def test_trains_from_prepared_shards(tmp_path, capsys):
    text = word_text(tmp_path / "words.txt")
    shards = tmp_path / "shards"
    assert main(["prepare", str(text), "--out", str(shards), "--shard-tokens", "1000", "--workers", "1",
                 "--no-progress"]) == 0
    options = tiny_options(text, tmp_path / "run", max_steps=3)
    del options["text"]
    assert main(["pretrain", "--data", str(shards), *as_flags(options)]) == 0
    out = capsys.readouterr().out
    assert "step 3/3 |" in out or (tmp_path / "run" / "ckpt_000003").is_dir()
    assert (tmp_path / "run" / "ckpt_000003" / "state.json").is_file()
    err = _error(capsys, ["pretrain", "--data", str(tmp_path / "nothing"), *as_flags(options)])
    assert "nothing" in err


def test_dtype_accepts_torch_names_and_prints_the_canonical_one(tmp_path, capsys):
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "run", max_steps=1, dtype="float32")
    assert main(["pretrain", *as_flags(options)]) == 0
    out = capsys.readouterr()
    assert "dtype fp32" in out.out + out.err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "fp32"
    options = tiny_options(text, tmp_path / "bad", max_steps=1, dtype="fp64")
    err = _error(capsys, ["pretrain", *as_flags(options)])
    assert "--dtype 'fp64'" in err and "fp32" in err
