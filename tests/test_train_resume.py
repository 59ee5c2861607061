"""Checkpoints: a run killed at any point resumes to the same losses, bit-for-bit on CPU."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgpt.cli import main
from fastgpt.train import TrainConfig, train
from fastgpt.train.checkpoint import CRASH_IN_SAVE_ENV, load_model_state, read_state
from train_helpers import as_flags, tiny_options, train_losses, word_text

REPO = Path(__file__).resolve().parents[1]


def _launch(options: dict, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastgpt", "pretrain", *as_flags(options), *extra],
                            cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {path.name} appeared: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def test_sigkill_then_resume_matches_uninterrupted_bitwise(tmp_path):
    text = word_text(tmp_path / "words.txt")
    common = dict(max_steps=30, ckpt_interval=4, keep_last=0, dropout=0.1)  # dropout: RNG state must resume too
    reference = train(TrainConfig(**tiny_options(text, tmp_path / "reference", **common)))

    run = tmp_path / "killed"
    proc = _launch(tiny_options(text, run, **common))
    _wait_for(run / "ckpt_000008", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "ckpt_000030").exists()

    resumed = _launch({"threads": 1, "progress": False}, "--resume", str(run))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 31))
    assert losses == dict(enumerate(reference.losses, start=1))  # exact float equality


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "run", max_steps=12, ckpt_interval=4, keep_last=1)
    proc = _launch(options, env={CRASH_IN_SAVE_ENV: "8"})
    assert proc.wait(timeout=300) == 17, proc.stderr.read()[-2000:]
    run = tmp_path / "run"
    assert (run / "ckpt_000008.tmp").is_dir() and not (run / "ckpt_000008").exists()
    assert read_state(run / "ckpt_000004")["step"] == 4                 # the previous one is intact
    config, weights, _ = load_model_state(run / "ckpt_000004" / "model")
    assert config.n_embd == 32 and "tok_emb.weight" in weights

    resumed = train(TrainConfig(**options), resume=run)
    assert resumed.step == 12 and not (run / "ckpt_000008.tmp").exists()
    reference = train(TrainConfig(**tiny_options(text, tmp_path / "reference", max_steps=12)))
    assert train_losses(run) == dict(enumerate(reference.losses, start=1))
    assert [p.name for p in sorted(run.glob("ckpt_*"))] == ["ckpt_000012"]  # keep_last=1 pruned the rest


def test_sigint_saves_and_exits_130(tmp_path):
    text = word_text(tmp_path / "words.txt")
    run = tmp_path / "run"
    proc = _launch(tiny_options(text, run, max_steps=400, ckpt_interval=3, keep_last=0))
    _wait_for(run / "ckpt_000003", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()[-2000:]
    last_logged = max(train_losses(run))
    assert last_logged < 400
    assert read_state(run / f"ckpt_{last_logged:06d}")["step"] == last_logged


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_resume_with_another_architecture_is_refused(tmp_path, capsys):
    text = word_text(tmp_path / "words.txt")
    run = tmp_path / "run"
    train(TrainConfig(**tiny_options(text, run, max_steps=2)))
    before = _tree_digest(run)
    assert main(["pretrain", "--resume", str(run), "--n-layer", "3", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n_layer=2" in err and "n_layer=3" in err
    assert main(["pretrain", "--resume", str(run), "--no-tie-embeddings", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tie_embeddings=True" in err and "tie_embeddings=False" in err
    assert main(["pretrain", "--resume", str(run), "--init", "pytorch", "--max-steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "init=gpt2" in err and "another initialisation" in err
    assert _tree_digest(run) == before
