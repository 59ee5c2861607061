"""AdamW with decoupled weight decay on matrices only.

Decaying biases and LayerNorm gains pulls them toward zero for no benefit, so
parameters with fewer than two dimensions (and nothing else) are exempt. The
fused or multi-tensor ("foreach") kernels do the update in a few launches
instead of one per parameter.
"""
from __future__ import annotations

import inspect

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused when this torch supports it on `device`, else foreach."""
    groups = parameter_groups(model, weight_decay)
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
