"""Learning rate: linear warmup, then cosine decay to a floor.

Warmup keeps the first updates small while Adam's second-moment estimates are
still noisy; the cosine then anneals from `lr` to `min_lr` at `max_steps`.
The schedule is a pure function of the step, so resuming needs only the step.
"""
from __future__ import annotations

import math


def learning_rate(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    steps 0..warmup-1:   lr * (step + 1) / warmup      (never exactly zero)
    warmup..max_steps:   min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2
    after max_steps:     min_lr
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_steps = max(1, max_steps - warmup_steps)
    progress = (step - warmup_steps) / decay_steps
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
