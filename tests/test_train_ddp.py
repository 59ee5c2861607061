"""Data parallelism: 2 gloo processes under torchrun == 1 process with the same global batch.

DDP replicates the model; FSDP (FSDP2, `fully_shard` per block) shards it and
gathers the full state for checkpoints. Both run on CPU with gloo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import as_flags, tiny_options, train_losses, word_text

from fastgpt.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, strategy):
    text = word_text(tmp_path / "words.txt")
    # global batch 8 sequences: 1 process x 2 micro-batches of 4 == 2 processes x 1 micro-batch of 4
    one = train(TrainConfig(**tiny_options(text, tmp_path / "one", micro_batch=4, tokens_per_step=8 * 16,
                                           max_steps=4, eval_interval=2)))
    options = tiny_options(text, tmp_path / "two", micro_batch=4, tokens_per_step=8 * 16, max_steps=4,
                           eval_interval=2, distributed=strategy)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastgpt", "pretrain", *as_flags(options)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = train_losses(tmp_path / "two")
    assert list(two) == [1, 2, 3, 4]
    assert list(two.values()) == pytest.approx(one.losses, rel=1e-5, abs=1e-5)
    assert one.losses[0] != one.losses[-1]
    # only rank 0 logs: one line per step, not two
    assert proc.stdout.count("step 3/4 |") + proc.stderr.count("step 3/4 |") == 1
    assert (tmp_path / "two" / "ckpt_000004" / "model" / "model.safetensors").is_file()
    # the checkpoint holds the full (unsharded) weights: it loads as a plain model
    from fastgpt.train.checkpoint import load_model_state
    config, weights, _ = load_model_state(tmp_path / "two" / "ckpt_000004" / "model")
    assert weights["tok_emb.weight"].shape == (config.padded_vocab_size, 32)  # (held padded; the file: vocab_size)
