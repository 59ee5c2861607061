"""What learns during fine-tuning: every weight, only the top of the network, or LoRA adapters.

Shared by `finetune classify` and `finetune instruct`, so that `--trainable` means the
same in both; a task adds its own extras afterwards (the classifier unfreezes its head).
The mode names live in `fastgpt.finetune.config`, which the CLI reads without torch.
"""
from __future__ import annotations

from ..errors import FastGPTError
from .config import DEFAULT_LORA_TARGETS, TRAINABLE
from .lora import apply_lora


def set_trainable(gpt, mode: str = "all", last_n: int = 1, lora_rank: int = 8, lora_alpha: float = 16.0,
                  lora_targets=DEFAULT_LORA_TARGETS, lora_dropout: float = 0.0, modes=TRAINABLE) -> None:
    """Set requires_grad on the GPT body (`mode` must be one of `modes`):

    all      every parameter
    last-n   the last `last_n` blocks and the final LayerNorm (embeddings, hence a tied LM head, stay frozen)
    lora     adapters wrapped around the `lora_targets` linear layers; everything else frozen
    """
    if mode not in modes:
        raise FastGPTError(f"--trainable: unknown mode {mode!r} (choose from: {', '.join(modes)})")
    if mode == "lora":
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise FastGPTError(f"--lora-rank: must be a positive integer, got {lora_rank}")
        apply_lora(gpt, lora_rank, lora_alpha, lora_targets, lora_dropout)  # freezes the base itself
        return
    if mode == "last-n" and not 0 <= last_n <= len(gpt.blocks):
        raise FastGPTError(f"--last-n: must be between 0 and {len(gpt.blocks)} (the model's blocks), got {last_n}")
    for p in gpt.parameters():
        p.requires_grad_(mode == "all")
    if mode == "last-n":
        for module in [*gpt.blocks[len(gpt.blocks) - last_n:], gpt.ln_f]:
            for p in module.parameters():
                p.requires_grad_(True)
