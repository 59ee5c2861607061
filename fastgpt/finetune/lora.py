"""LoRA: fine-tune a big matrix through a small low-rank update.

A frozen linear layer y = x W^T + b gets a trainable detour of rank r:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,    A: (r, in), B: (out, r)

A starts random and B at zero, so before training the model is exactly the one
loaded; only r * (in + out) numbers per matrix learn. After training the update
can be folded into W (`merge_lora`), which costs nothing at inference.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import FastGPTError
from .config import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS
from .files import write_atomic

CONFIG_KEY = "lora_config"


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight` and `bias`, same state-dict names) plus a low-rank update.

    `matmul_no_bias(x)` is the adapted x W^T without the bias, for callers that fuse
    the bias into the next op (the MLP adds fc's bias inside its GELU kernel).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        if rank < 1:
            raise FastGPTError(f"LoRA rank must be a positive integer, got {rank}")
        # Built on the meta device (no memory), then handed the base's own tensors: no copies.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.base_class = type(base)  # what merging or unwrapping gives back (the model may rely on its methods)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device,
                                               dtype=self.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device,
                                               dtype=self.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.lora_delta(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_delta(x)

    def merged_linear(self) -> nn.Linear:
        """The base layer's class (an nn.Linear) holding W + scaling * B A (and the same bias tensor)."""
        linear = self.base_class(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            merged = self.weight + (self.lora_B @ self.lora_A) * self.scaling
        linear.weight = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _targets_of(model: nn.Module, targets) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear whose own name is in `targets`."""
    targets = tuple(targets)
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if attr in targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                found.append((parent, attr, child))
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS,
               dropout: float = 0.0, freeze_base: bool = True) -> nn.Module:
    """Wrap every target linear layer (matched by its attribute name) in a LoRALinear.

    With `freeze_base`, every parameter that existed before is frozen, so only the
    adapters train (unfreeze e.g. a classification head afterwards). The lm_head is
    never a target: in GPT-2 it is the token embedding itself (tied).
    """
    found = [(p, a, c) for p, a, c in _targets_of(model, targets) if a != "lm_head"]
    if not found:
        raise FastGPTError(f"--lora-targets {','.join(targets)}: no linear layer of the model has these names")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for parent, attr, linear in found:
        setattr(parent, attr, LoRALinear(linear, rank, alpha, dropout))
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets)}
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace_lora_layers(model: nn.Module, make_linear) -> nn.Module:
    """Put `make_linear(layer)`, a plain nn.Linear, in place of every LoRALinear."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make_linear(layer))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back."""
    return _replace_lora_layers(model, LoRALinear.merged_linear)


def unmerged_base(model: nn.Module) -> nn.Module:
    """A plain copy of `model` without its adapters (not merged into it): the frozen weights
    that LoRA trains around, which a resumable checkpoint must store exactly. The copy
    shares every parameter and buffer with `model`, so it costs no memory."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    base = copy.deepcopy(model, memo=shared)

    def plain(layer: LoRALinear) -> nn.Linear:
        linear = layer.base_class(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        return linear
    return _replace_lora_layers(base, plain)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each shared tensor counted once, and a GPT's vocabulary pad rows (zero, no
    token: see GPTConfig.padded_vocab_size) left out, as `GPT.num_parameters` leaves them."""
    pad = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if hasattr(cfg, "padded_vocab_size") and hasattr(module, "tok_emb"):
            for matrix in (module.tok_emb, getattr(module, "lm_head", None)):
                if isinstance(getattr(matrix, "weight", None), torch.Tensor):
                    pad[id(matrix.weight)] = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() - pad.get(id(p), 0)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """e.g. "trainable: 294,912 / 124,734,720 (0.24%)"."""
    trainable, total = count_parameters(model)
    return f"trainable: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"


# ---------------------------------------------------------------------- adapter files
def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Only the adapter matrices (and the LoRA config) to one safetensors file, atomically."""
    layers = lora_layers(model)
    if not layers:
        raise FastGPTError("save_adapters: the model has no LoRA layers (call apply_lora first)")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().contiguous().cpu()
    config = getattr(model, "lora_config", None) or {
        "rank": next(iter(layers.values())).rank, "alpha": next(iter(layers.values())).alpha,
        "dropout": 0.0, "targets": sorted({n.rpartition(".")[2] for n in layers})}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={CONFIG_KEY: json.dumps(config)}))


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the adapters of `path` to `model` (wrapping its layers first if needed)."""
    path = Path(path)
    if not path.is_file():
        raise FastGPTError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise FastGPTError(f"{path}: not a safetensors adapter file ({err})") from None
    if CONFIG_KEY not in meta:
        raise FastGPTError(f"{path}: no {CONFIG_KEY!r} in the safetensors metadata (not a fastgpt LoRA file)")
    config = json.loads(meta[CONFIG_KEY])
    if not lora_layers(model):
        apply_lora(model, config["rank"], config["alpha"], config["targets"], config.get("dropout", 0.0))
    layers = lora_layers(model)
    expected = {f"{n}.lora_{m}" for n in layers for m in "AB"}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
        raise FastGPTError(f"{path}: adapter tensors do not match the model (first mismatch: {missing[0]})")
    with torch.no_grad():
        for name, layer in layers.items():
            for m in "AB":
                dst, src = getattr(layer, f"lora_{m}"), tensors[f"{name}.lora_{m}"]
                if dst.shape != src.shape:
                    raise FastGPTError(f"{path}: {name}.lora_{m} has shape {tuple(src.shape)}, "
                                       f"the model expects {tuple(dst.shape)}")
                dst.copy_(src)
    return model
