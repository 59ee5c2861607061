"""GPT-2's own parameter names and layout, and how they map onto fastgpt's modules.

OpenAI's GPT-2 code, and Hugging Face's port of it, name the weights `wte`, `wpe`,
`h.{i}.attn.c_attn`, ... and store every projection as a "Conv1D" whose weight is
(in_features, out_features): `y = x @ W + b`. fastgpt uses `nn.Linear`, whose weight
is (out, in): `y = x @ W.T + b`. So those four matrices per block are transposed on
the way in and out; everything else (embeddings, LayerNorms, biases) maps unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import GPTConfig
from ..errors import FastGPTError
from .state import expected_shapes, file_state

# (GPT-2 name, fastgpt name, stored as a Conv1D (in, out) matrix?)
_TOP = [("wte.weight", "tok_emb.weight", False), ("wpe.weight", "pos_emb.weight", False),
        ("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False)]
_BLOCK = [("ln_1.weight", "ln_1.weight", False), ("ln_1.bias", "ln_1.bias", False),
          ("attn.c_attn.weight", "attn.qkv.weight", True), ("attn.c_attn.bias", "attn.qkv.bias", False),
          ("attn.c_proj.weight", "attn.proj.weight", True), ("attn.c_proj.bias", "attn.proj.bias", False),
          ("ln_2.weight", "ln_2.weight", False), ("ln_2.bias", "ln_2.bias", False),
          ("mlp.c_fc.weight", "mlp.fc.weight", True), ("mlp.c_fc.bias", "mlp.fc.bias", False),
          ("mlp.c_proj.weight", "mlp.proj.weight", True), ("mlp.c_proj.bias", "mlp.proj.bias", False)]


def name_map(n_layer: int) -> list[tuple[str, str, bool]]:
    """Every (GPT-2 name, fastgpt name, is_conv1d) of a model with `n_layer` blocks."""
    names = list(_TOP)
    for i in range(n_layer):
        names += [(f"h.{i}.{g}", f"blocks.{i}.{f}", conv) for g, f, conv in _BLOCK]
    return names


def from_gpt2(cfg: GPTConfig, tensors: dict[str, torch.Tensor], source: str,
              label: Callable[[str], str] = lambda name: name) -> dict[str, torch.Tensor]:
    """GPT-2-named tensors -> fastgpt state dict, checking that every tensor is there with the right shape.

    `label` turns a GPT-2 name into the name the file uses, so that errors quote the file's own key.
    """
    shapes, state = expected_shapes(cfg), {}
    for gpt2_name, ours, conv1d in name_map(cfg.n_layer):
        if gpt2_name not in tensors:
            raise FastGPTError(f"{source}: missing tensor {label(gpt2_name)!r}")
        tensor, want = tensors[gpt2_name], shapes[ours]
        want_in_file = tuple(reversed(want)) if conv1d else want
        if tuple(tensor.shape) != want_in_file:
            raise FastGPTError(f"{source}: tensor {label(gpt2_name)!r} has shape {tuple(tensor.shape)}, "
                               f"but the config needs {want_in_file}")
        if not tensor.is_floating_point():
            raise FastGPTError(f"{source}: tensor {label(gpt2_name)!r} has dtype {tensor.dtype}, expected floats")
        state[ours] = tensor.t() if conv1d else tensor
    return state


def to_gpt2(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under GPT-2 names in GPT-2's layout (contiguous CPU tensors, vocab_size rows; no
    LM head: an untied one is saved by the caller, under the name its format uses). `state`: the model's
    `file_state`, when the caller has it already."""
    params = file_state(model) if state is None else state
    return {gpt2_name: params[ours].t().contiguous() if conv1d else params[ours]
            for gpt2_name, ours, conv1d in name_map(model.config.n_layer)}
