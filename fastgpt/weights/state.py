"""Build a `GPT` straight from a state dict, without paying for a random initialisation.

The model is constructed on the meta device (shapes only, no memory), and the loaded
tensors are then assigned as its parameters. A checkpoint of GPT-2 XL would otherwise
first be filled with 1.5 billion random numbers only to have them overwritten.
"""
from __future__ import annotations

import itertools

import torch

from ..config import GPTConfig
from ..errors import FastGPTError
from ..model import GPT

TIED = "lm_head.weight"  # a tied LM head shares the token embedding matrix, stored once


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """fastgpt parameter name -> shape, for every tensor a checkpoint must provide
    (the LM head only when it is untied: a tied one is the token embedding)."""
    with torch.device("meta"):
        model = GPT(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()
            if name != TIED or not cfg.tie_embeddings}


def build_model(cfg: GPTConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> GPT:
    """A GPT in eval mode holding `state` (fastgpt names, checked shapes) on `device`, as `dtype` (default float32)."""
    if isinstance(dtype, str):  # "bfloat16" as well as torch.bfloat16
        dtype = getattr(torch, dtype, None) if isinstance(getattr(torch, dtype, None), torch.dtype) else dtype
    dtype = dtype or torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FastGPTError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    tensors = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    if cfg.tie_embeddings:
        tensors[TIED] = tensors["tok_emb.weight"]
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # `assign` gave each name its own Parameter: tie them again
    if any(t.is_meta for _, t in itertools.chain(model.named_parameters(), model.named_buffers())):
        # Some buffer is computed in __init__ rather than stored: build the model for real.
        model = GPT(cfg).to(device=device, dtype=dtype)
        model.load_state_dict(tensors, strict=True)
    return model.eval()
