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
import torch
from train_helpers import as_flags, tiny_options, train_losses, word_text

from fastgpt.cli import main
from fastgpt.train import TrainConfig, train
from fastgpt.train.checkpoint import CRASH_IN_SAVE_ENV, load_model_state, read_state

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


# Oversubscribed OpenMP/MKL pools (as on a many-core host) must not matter: the run's own --threads wins.
MANY_CORES = {"OMP_NUM_THREADS": "16", "MKL_NUM_THREADS": "16"}


def test_sigkill_then_resume_matches_uninterrupted_bitwise(tmp_path):
    text = word_text(tmp_path / "words.txt")
    common = dict(max_steps=30, ckpt_interval=4, keep_last=0, dropout=0.1)  # dropout: RNG state must resume too
    reference = train(TrainConfig(**tiny_options(text, tmp_path / "reference", **common)))

    run = tmp_path / "killed"
    proc = _launch(tiny_options(text, run, **common), env=MANY_CORES)
    _wait_for(run / "ckpt_000008", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "ckpt_000030").exists()

    # Only --resume: device (cpu) and threads (1) come from the checkpoint, as they must on any host.
    resumed = _launch({"progress": False}, "--resume", str(run), env=MANY_CORES)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 31))
    assert losses == dict(enumerate(reference.losses, start=1))  # exact float equality


def test_resume_runs_on_the_checkpoints_device_and_threads(tmp_path, monkeypatch):
    """The cause of the step-9 divergence on the H100 host: `--resume` alone left the invocation's
    defaults (device auto, torch's thread count) in force, so a CPU run resumed on the GPU there.
    Simulated here by recording which device is asked for and how many threads the steps run with."""
    from fastgpt.train import distributed, loop

    text = word_text(tmp_path / "words.txt")
    run = tmp_path / "run"
    train(TrainConfig(**tiny_options(text, run, max_steps=2, ckpt_interval=1)))  # device cpu, 1 thread
    requested, threads = [], []
    real_setup, real_step = distributed.setup, loop.train_step
    monkeypatch.setattr(distributed, "setup", lambda name: (requested.append(name), real_setup("cpu"))[1])
    monkeypatch.setattr(loop, "train_step", lambda *args, **kwargs: (threads.append(torch.get_num_threads()),
                                                                     real_step(*args, **kwargs))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train(TrainConfig(max_steps=3, progress=False, loss_plot=False), resume=run)
    finally:
        torch.set_num_threads(before)
    assert result.step == 3 and result.config["device"] == "cpu" and result.config["threads"] == 1
    assert requested == ["cpu"] and threads == [1]


def test_fused_adamw_continues_bitwise_from_its_saved_state(tmp_path):
    """The optimizer (fused AdamW on CPU where torch has it) continues from optimizer.pt exactly, and its
    update does not depend on the thread count. (The forward and backward do: measured here, 1 and 2
    threads give different weights after two steps, which is why a resumed run takes its --threads
    from the checkpoint.)"""
    from fastgpt.model import GPT
    from fastgpt.train.optim import make_optimizer
    from fastgpt.train.step import train_step

    torch.manual_seed(0)
    config = TrainConfig(preset="tiny", n_embd=32, n_head=2, n_layer=2, context_length=16).model_config()
    batches = [[(torch.randint(0, 500, (2, 16)), torch.randint(0, 500, (2, 16)))] for _ in range(5)]

    def with_threads(threads, work):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            work()
        finally:
            torch.set_num_threads(before)

    def run(model, optimizer, steps):
        for batch in steps:
            train_step(lambda b: model(*b), batch, optimizer, list(model.parameters()), lr=1e-2, grad_clip=1.0)

    a, b = GPT(config), GPT(config)
    opt_a = make_optimizer(a, 1e-2, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    with_threads(1, lambda: run(a, opt_a, batches[:3]))
    torch.save(opt_a.state_dict(), tmp_path / "optimizer.pt")
    b.load_state_dict(a.state_dict())
    opt_b = make_optimizer(b, 1e-2, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    opt_b.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    with_threads(1, lambda: (run(a, opt_a, batches[3:]), run(b, opt_b, batches[3:])))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name

    grads = [torch.randn_like(p) for p in a.parameters()]
    for model, optimizer, threads in ((a, opt_a, 1), (b, opt_b, 2)):  # the same gradients, 1 and 2 threads
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        with_threads(threads, optimizer.step)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


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


def test_a_cpu_run_on_a_gpu_host_saves_no_cuda_rng_state(monkeypatch):
    """Simulates a visible GPU that the run never used: its generators are neither read (which would
    start a CUDA context in a CPU run) nor saved; the CPU state round-trips."""
    from fastgpt.train.checkpoint import rng_state, set_rng_state

    def untouchable(*args, **kwargs):
        raise AssertionError("a CPU run touched CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", untouchable)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", untouchable)
    plain, tensors = rng_state()
    assert set(tensors) == {"torch"}
    expected = torch.rand(4)
    set_rng_state(plain, tensors)
    assert torch.equal(torch.rand(4), expected)
