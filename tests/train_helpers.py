"""Shared tiny-run settings for the trainer tests (kept small: 2 shared CPU cores)."""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the king is dead long live the queen of hearts and all her knights ride out at dawn "
         "to fight the dragon that sleeps beneath the hill").split()


def word_text(path: Path, n_words: int = 3000, seed: int = 0) -> Path:
    """A small text with learnable structure (a fixed vocabulary of words)."""
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)))
    return path


def tiny_options(text: Path, out_dir: Path, **overrides) -> dict:
    options = dict(text=str(text), preset="tiny", n_embd=32, n_head=2, n_layer=2, context_length=16,
                   micro_batch=4, max_steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=0,
                   eval_batches=2, sample_tokens=4, out_dir=str(out_dir), progress=False, loss_plot=False,
                   threads=1, dtype="fp32", device="cpu")  # CPU semantics (bit-exact resume) on any machine
    options.update(overrides)
    return options


def as_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss, from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
