"""Model hyper-parameters and the GPT-2 presets.

A `GPTConfig` is all that is needed to build a `GPT`; it is saved next to every
checkpoint so that a checkpoint can be rebuilt without any other file.

Two fields choose between GPT-2 and the model of "Build a Large Language Model
(From Scratch)" (ch. 4-5): `tie_embeddings` (GPT-2 reuses the token embedding as
the output head; the book's model has a separate head) and `init` (GPT-2's
N(0, 0.02) scheme, or PyTorch's module defaults as the book keeps them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from .errors import FastGPTError

INIT_SCHEMES = ("gpt2", "pytorch")
# The token embedding / LM head is stored with its rows padded (zero rows) to a multiple of this:
# GPT-2's odd 50257 would leave bf16 logits rows unaligned, and cuBLAS then runs slow GEMMs.
VOCAB_PAD = 64


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True   # the LM head reuses the token embedding matrix (GPT-2)
    init: str = "gpt2"            # random initialisation: "gpt2" or "pytorch" (see GPT.reset_parameters)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FastGPTError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise FastGPTError(
                f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise FastGPTError(f"config: dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.tie_embeddings, bool):
            raise FastGPTError(f"config: tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.init not in INIT_SCHEMES:
            raise FastGPTError(f"config: init must be one of {', '.join(map(repr, INIT_SCHEMES))}, "
                               f"got {self.init!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the stored token embedding / LM head: vocab_size rounded up to VOCAB_PAD.
        Ids at or past vocab_size are never produced nor scored; files hold vocab_size rows."""
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FastGPTError(f"{source}: unknown config key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)  # keys added later (tie_embeddings, init) take their defaults
        except FastGPTError as err:
            raise FastGPTError(f"{source}: {str(err).removeprefix('config: ')}") from None

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


# The four released GPT-2 sizes; "tiny" / "mini" are for tests and CPU demos.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=256, context_length=256),
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, context_length=64),
}


def preset(name: str, **overrides) -> GPTConfig:
    """The named preset, optionally with fields replaced (e.g. dropout=0.1)."""
    if name not in PRESETS:
        raise FastGPTError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
