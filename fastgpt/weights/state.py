"""Build a `GPT` straight from a state dict, without paying for a random initialisation,
and the one place where stored tensors and the model's padded vocabulary meet.

The model is constructed on the meta device (shapes only, no memory), and the loaded
tensors are then assigned as its parameters. A checkpoint of GPT-2 XL would otherwise
first be filled with 1.5 billion random numbers only to have them overwritten.

In memory the token embedding and LM head hold `padded_vocab_size` rows (zero past
`vocab_size`, see `GPTConfig`); every file holds the real `vocab_size` rows. So every
writer takes its tensors from `file_state` and every reader goes through `build_model`
(which pads), whatever the format; `pad_vocab_rows` also fits older optimizer moments.
"""
from __future__ import annotations

import itertools

import torch

from ..config import GPTConfig
from ..errors import FastGPTError
from ..model import GPT

TIED = "lm_head.weight"  # a tied LM head shares the token embedding matrix, stored once
VOCAB_MATRICES = ("tok_emb.weight", TIED)  # stored with vocab_size rows, held with padded_vocab_size


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """fastgpt parameter name -> shape in a file, for every tensor a checkpoint must provide
    (vocab_size rows for the vocabulary matrices; the LM head only when it is untied: a tied
    one is the token embedding)."""
    with torch.device("meta"):
        model = GPT(cfg)
    return {name: (cfg.vocab_size, *t.shape[1:]) if name in VOCAB_MATRICES else tuple(t.shape)
            for name, t in model.state_dict().items() if name != TIED or not cfg.tie_embeddings}


def pad_vocab_rows(tensor: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """A (vocab_size, ...) tensor with zero rows appended up to padded_vocab_size (the model's
    shape); one already padded is returned as it is."""
    rows = tensor.shape[0]
    if rows == cfg.padded_vocab_size:
        return tensor
    if rows != cfg.vocab_size:
        raise FastGPTError(f"a vocabulary matrix has {rows} rows, but the config needs {cfg.vocab_size}")
    return torch.cat([tensor, tensor.new_zeros(cfg.padded_vocab_size - rows, *tensor.shape[1:])])


def file_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict as files hold it: contiguous CPU tensors, the vocabulary matrices cut
    to vocab_size rows, a tied LM head left out (it is the token embedding)."""
    cfg = model.config
    return {name: (t[:cfg.vocab_size] if name in VOCAB_MATRICES else t).detach().cpu().contiguous()
            for name, t in model.state_dict().items() if name != TIED or not cfg.tie_embeddings}


def build_model(cfg: GPTConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> GPT:
    """A GPT in eval mode holding `state` (fastgpt names, checked shapes) on `device`, as `dtype` (default float32)."""
    if isinstance(dtype, str):  # "bfloat16" as well as torch.bfloat16
        dtype = getattr(torch, dtype, None) if isinstance(getattr(torch, dtype, None), torch.dtype) else dtype
    dtype = dtype or torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FastGPTError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    # contiguous: GPT-2's Conv1D layout arrives as transposed views, which `assign` would keep,
    # and CPU BLAS multiplies a transposed 16-bit matrix on its slow path (fp16 GPT-2 decoded at
    # 7 instead of 80 tokens/s on a 2-core EPYC)
    tensors = {name: (pad_vocab_rows(t, cfg) if name in VOCAB_MATRICES else t).to(device=device, dtype=dtype)
               .contiguous() for name, t in state.items()}
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
