"""The classifier network: a GPT body and a linear head on the last real token.

With causal attention the last real token is the only position that has seen the whole
text. Padding must not change the answer, so batches carry a mask of real tokens (left,
right or any padding) and are packed to the left before the model runs, where causality
keeps pads out of every real token's view. Kept apart from the training code
(`classify.py`) so that loading a saved classifier (`checkpoint.py`) needs only this.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import FastGPTError
from .config import POOLINGS


def pack_left(idx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front, in order; returns (ids, lengths).

    Positions then count from 0 for every sequence and, attention being causal, no
    real token sees a pad: each row computes exactly what it would alone.
    """
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise FastGPTError("a sequence in the batch has no real tokens (empty text)")
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
    return idx.gather(1, order)[:, :int(lengths.max())], lengths


class GPTClassifier(nn.Module):
    """A GPT body, and a linear head on the last real token's final hidden state (pooling "last") or on the
    mean of all real tokens' ("mean")."""

    def __init__(self, gpt: nn.Module, num_classes: int, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise FastGPTError(f"pooling: unknown {pooling!r} (choose from: {', '.join(POOLINGS)})")
        self.gpt, self.pooling = gpt, pooling
        self.head = nn.Linear(gpt.config.n_embd, num_classes, device=gpt.device)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes); `mask` (B, T) marks real tokens (None: no padding)."""
        if mask is None:
            mask = torch.ones_like(idx, dtype=torch.bool)
        packed, lengths = pack_left(idx, mask)
        hidden = self.gpt.hidden_states(packed)  # (B, T, C)
        if self.pooling == "mean":  # pads are packed to the right: average the first `length` positions
            real = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
            return self.head((hidden * real.unsqueeze(-1)).sum(1) / lengths[:, None].to(hidden.dtype))
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.head(last)
