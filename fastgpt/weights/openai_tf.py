"""OpenAI's original GPT-2 release: a TensorFlow checkpoint plus `hparams.json`.

The directory OpenAI published for each size holds `hparams.json` (n_vocab, n_ctx,
n_embd, n_head, n_layer), a `checkpoint` file naming the checkpoint prefix, and the
`model.ckpt.{index,data-00000-of-00001,meta}` files. The variables are named like
`model/h0/attn/c_attn/w`; LayerNorm gains and biases are `g` and `b`, and each
projection weight is a 1x1 convolution kernel of shape (1, in, out).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import GPTConfig
from ..errors import FastGPTError
from .gpt2_layout import from_gpt2, name_map
from .state import build_model
from .tensor_bundle import read_bundle

HPARAMS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def config_from_hparams(raw: dict, source: str) -> GPTConfig:
    values = {}
    for key in HPARAMS:
        if key not in raw:
            raise FastGPTError(f"{source}: missing key {key!r}")
        if not isinstance(raw[key], int) or isinstance(raw[key], bool):
            raise FastGPTError(f"{source}: key {key!r} must be an integer, got {raw[key]!r}")
        values[key] = raw[key]
    try:
        # OpenAI's model code uses LayerNorm epsilon 1e-5, as GPTConfig does by default.
        return GPTConfig(vocab_size=values["n_vocab"], context_length=values["n_ctx"], n_embd=values["n_embd"],
                         n_head=values["n_head"], n_layer=values["n_layer"])
    except FastGPTError as err:
        raise FastGPTError(f"{source}: {err}") from None


def tf_name(gpt2_name: str) -> str:
    """GPT-2 name -> OpenAI variable name.

    'h.3.attn.c_attn.weight' -> 'model/h3/attn/c_attn/w', 'ln_f.weight' -> 'model/ln_f/g', 'wte.weight' -> 'model/wte'.
    """
    *path, leaf = gpt2_name.split(".")
    if path[0] == "h":
        path = [f"h{path[1]}", *path[2:]]
    if path[-1] in ("wte", "wpe"):
        return "model/" + "/".join(path)
    is_norm = path[-1].startswith("ln_")
    return "model/" + "/".join(path) + "/" + {"weight": "g" if is_norm else "w", "bias": "b"}[leaf]


def checkpoint_prefix(directory: Path) -> Path:
    """The checkpoint prefix named by the `checkpoint` file (default `model.ckpt`)."""
    state_file = directory / "checkpoint"
    name = "model.ckpt"
    if state_file.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', state_file.read_text(errors="replace"), re.M)
        if not match:
            raise FastGPTError(f"{state_file}: no model_checkpoint_path line")
        name = match.group(1)
    prefix = Path(name) if Path(name).is_absolute() else directory / name
    if not prefix.with_name(prefix.name + ".index").is_file():
        # TensorFlow may record an absolute path from the machine that saved it.
        prefix = directory / Path(name).name
    if not prefix.with_name(prefix.name + ".index").is_file():
        raise FastGPTError(f"{directory}: checkpoint index {prefix.name}.index not found")
    return prefix


def _is_training_state(name: str) -> bool:
    """Optimizer slots and counters that fine-tuning scripts save next to the weights."""
    return not name.startswith("model/") or re.search(r"/Adam(_\d+)?$", name) is not None


def load_openai_tf(directory: Path, raw_hparams: dict, device="cpu", dtype=None):
    cfg = config_from_hparams(raw_hparams, str(directory / "hparams.json"))
    prefix = checkpoint_prefix(directory)
    variables = read_bundle(prefix)
    names = {tf_name(gpt2_name): (gpt2_name, conv1d) for gpt2_name, _, conv1d in name_map(cfg.n_layer)}
    tensors: dict[str, torch.Tensor] = {}
    for var, tensor in sorted(variables.items()):
        if var not in names:
            if _is_training_state(var):
                continue
            raise FastGPTError(f"{prefix}: unexpected variable {var!r} (not part of a GPT-2 model with "
                               f"n_layer={cfg.n_layer} as hparams.json says)")
        gpt2_name, conv1d = names[var]
        if conv1d and tensor.dim() == 3 and tensor.shape[0] == 1:
            tensor = tensor[0]  # (1, in, out) convolution kernel -> (in, out)
        tensors[gpt2_name] = tensor
    state = from_gpt2(cfg, tensors, f"{prefix} (with {directory / 'hparams.json'})", label=tf_name)
    return build_model(cfg, state, device, dtype)
