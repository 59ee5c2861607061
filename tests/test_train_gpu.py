"""The trainer on a CUDA GPU: bf16 autocast, the Triton kernels, a checkpoint, a resume.

The other trainer tests pin device="cpu" (their promises, such as bit-exact resume,
are CPU promises); this file is where a GPU run is checked. Skipped without CUDA.
"""
from __future__ import annotations

import math

from conftest import requires_gpu
from train_helpers import tiny_options, train_losses, word_text

from fastgpt.train import TrainConfig, train


@requires_gpu
def test_bf16_training_on_gpu_learns_and_resumes(tmp_path):
    text = word_text(tmp_path / "words.txt")
    options = tiny_options(text, tmp_path / "run", device="cuda", dtype="bf16", max_steps=30, eval_interval=15,
                           warmup_steps=5, lr=1e-2, min_lr=1e-3, n_embd=64, ckpt_interval=15, keep_last=0)
    result = train(TrainConfig(**options))
    assert result.step == 30 and all(math.isfinite(loss) for loss in result.losses)
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 3.0  # 25-word vocabulary: ~3.3 nats is reachable
    assert result.val_loss < 7.0
    # resume from step 15 and reach step 30 again: same data order, so close losses (GPU
    # kernels and bf16 autocast are not promised bit-exact, CPU resume is)
    run = tmp_path / "run"
    first = train_losses(run)
    resumed = train(TrainConfig(**{**options, "max_steps": 30}), resume=str(run / "ckpt_000015"))
    assert resumed.step == 30
    again = train_losses(run)
    assert abs(again[30] - first[30]) < 0.05 * first[30]
