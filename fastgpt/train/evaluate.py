"""Measuring a model during training: loss on fixed batches, and a text sample.

Eval batches are drawn once from a fixed seed, so the numbers at step 100 and
step 200 (and across runs) are losses on the same sequences and comparable.
Sampling uses its own generator so it never perturbs the training RNG stream
(which must stay identical for exact resume).
"""
from __future__ import annotations

import contextlib

import torch

from ..generate import generate
from ..tokenizer import Tokenizer


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches, device: torch.device, autocast) -> float:
    """Mean cross-entropy of `model` over `batches` [(x, y), ...] in eval mode."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches:
        with autocast():
            total += model(x.to(device), y.to(device)).double()
    model.train(was_training)
    return (total / max(1, len(batches))).item()


def sample_text(model: torch.nn.Module, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 40, seed: int = 0, autocast=contextlib.nullcontext, tokenizer=None) -> str:
    """`prompt` continued by up to `max_new_tokens` sampled tokens (fastgpt.generate, private RNG).

    `tokenizer`: the run's own (a `BPETokenizer`); None means GPT-2's."""
    tok = tokenizer if tokenizer is not None else Tokenizer()
    ids = tok.encode(prompt) or [tok.eot_id]
    with autocast():
        out = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       eos_id=None, cuda_graph=False)
    return prompt + tok.decode(out.tokens[0])
