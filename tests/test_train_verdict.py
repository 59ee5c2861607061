"""The book's chapter-5 run: a GPT-2-shaped model memorises `the-verdict.txt` in 10 epochs.

Settings as in the book: 124M-parameter GPT-2 shape at context 256, AdamW lr 4e-4
(constant), weight decay 0.1, dropout 0.1, batch 2, 90/10 train/val split, 10
epochs of shuffled non-overlapping windows. Train loss falls below 1 while the
val loss stays far higher: 4.6k training tokens are learned by heart, not
generalised from. Minutes on 2 CPU cores, hence FASTGPT_SLOW=1.
"""
from __future__ import annotations

import time

import pytest

from conftest import shared_file
from fastgpt.train import TrainConfig, train


@pytest.mark.slow
def test_gpt2_shape_overfits_the_verdict(tmp_path):
    text = shared_file("the-verdict.txt")
    cfg = TrainConfig(text=str(text), preset="gpt2", context_length=256, dropout=0.1, sampling="epoch",
                      epochs=10, micro_batch=2, lr=4e-4, min_lr=4e-4, warmup_steps=0, weight_decay=0.1,
                      grad_clip=0.0, eval_interval=9, eval_batches=9, eval_batch_size=2,
                      sample_prompt="Every effort moves you", sample_tokens=25, out_dir=str(tmp_path / "run"),
                      progress=False, ckpt_interval=0, keep_best=False, loss_plot=False)
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    records = [r for r in __import__("fastgpt.train.metrics", fromlist=["read_metrics"]).read_metrics(
        tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    print(f"\nthe-verdict, {result.step} steps in {minutes:.1f} min:")
    for r in records:
        print(f"  step {r['step']:3d} (epoch {r['step'] / 9:.1f}): train {r['train_loss']:.3f}  val {r['val_loss']:.3f}")
    print(result.sample)
    assert result.step == 90  # 18 windows of 256 tokens, 2 per step, 10 epochs
    assert result.train_loss < 1.0
    assert result.val_loss > result.train_loss + 3.0
