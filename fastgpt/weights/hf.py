"""Hugging Face GPT-2 directories: `config.json` plus safetensors or PyTorch weights.

Reading accepts what `transformers` writes and what the Hub serves: keys with or
without the `transformer.` prefix, `model.safetensors`, `pytorch_model.bin` (loaded
with `weights_only=True`, so no pickled code runs) and sharded `*.index.json`
checkpoints. Writing produces a directory that `GPT2LMHeadModel.from_pretrained` loads.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..config import GPTConfig
from ..errors import FastGPTError
from .atomic import replace_file
from .gpt2_layout import from_gpt2, name_map, to_gpt2
from .state import TIED, build_model, file_state

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PREFIX = "transformer."
# Buffers of older transformers versions (the causal mask), not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# GPT-2's MLP uses the tanh approximation of GELU, as does fastgpt's fused bias+GELU.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---------------------------------------------------------------- config
def config_from_hf(raw: dict, source: str) -> GPTConfig:
    """A GPTConfig from a parsed GPT-2 `config.json`, refusing settings fastgpt would compute differently."""
    def need(*keys):
        for key in keys:
            if key in raw:
                value = raw[key]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise FastGPTError(f"{source}: key {key!r} must be an integer, got {value!r}")
                return value
        raise FastGPTError(f"{source}: missing key {keys[0]!r}")

    unsupported = {
        "activation_function": raw.get("activation_function", "gelu_new") not in TANH_GELU,
        "n_inner": raw.get("n_inner") not in (None, 4 * raw.get("n_embd", 0)),
        "scale_attn_weights": raw.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": bool(raw.get("add_cross_attention", False)),
    }
    for key, bad in unsupported.items():
        if bad:
            raise FastGPTError(f"{source}: {key}={raw.get(key)!r} is not supported by fastgpt's GPT-2")
    tie = raw.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise FastGPTError(f"{source}: key 'tie_word_embeddings' must be true or false, got {tie!r}")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise FastGPTError(f"{source}: key 'layer_norm_epsilon' must be a positive number, got {eps!r}")
    try:
        return GPTConfig(vocab_size=need("vocab_size"), context_length=need("n_positions", "n_ctx"),
                         n_layer=need("n_layer"), n_head=need("n_head"), n_embd=need("n_embd"),
                         layer_norm_eps=float(eps), tie_embeddings=tie)
    except FastGPTError as err:
        raise FastGPTError(f"{source}: {err}") from None


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype) -> dict:
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "summary_type": "cls_index", "summary_use_proj": True,
        "summary_activation": None, "summary_proj_to_labels": True, "summary_first_dropout": 0.1,
        "use_cache": True, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------- tensors
def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise FastGPTError(f"{path}: not a readable safetensors file ({err})") from None


def _load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FastGPTError(f"{path}: not a loadable PyTorch weights file ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FastGPTError(f"{path}: expected a dict of tensors")
    return state


def _load_sharded(index_path: Path, load) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FastGPTError(f"{index_path}: not a valid shard index ({err})") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FastGPTError(f"{index_path}: shard {shard!r} is missing")
        tensors.update(load(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise FastGPTError(f"{index_path}: tensor {missing[0]!r} is listed but not in its shard")
    return tensors


def read_hf_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The raw tensors of an HF directory and the file they came from (first of WEIGHT_FILES present)."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.is_file():
            load = load_safetensors if "safetensors" in name else _load_torch_bin
            return (_load_sharded(path, load) if name.endswith(".index.json") else load(path)), path
    raise FastGPTError(f"{directory}: no weights file (expected one of: {', '.join(WEIGHT_FILES)})")


def load_hf(directory: Path, raw_config: dict, device="cpu", dtype=None):
    cfg = config_from_hf(raw_config, str(directory / "config.json"))
    raw, path = read_hf_tensors(directory)
    tensors, file_key = {}, {}
    for key, tensor in raw.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(IGNORED_SUFFIXES):
            continue
        tensors[name], file_key[name] = tensor, key
    known = {gpt2_name for gpt2_name, _, _ in name_map(cfg.n_layer)}
    head = tensors.pop("lm_head.weight", None)
    unexpected = sorted(set(tensors) - known, key=lambda n: file_key[n])
    if unexpected:
        raise FastGPTError(f"{path}: unexpected tensor {file_key[unexpected[0]]!r} (not part of a GPT-2 "
                           f"language model with {cfg.n_layer} layers)")
    prefixed = any(k.startswith(PREFIX) for k in raw)
    state = from_gpt2(cfg, tensors, str(path), label=lambda n: file_key.get(n, PREFIX * prefixed + n))
    if cfg.tie_embeddings:
        if head is not None and not (head.shape == tensors["wte.weight"].shape
                                     and torch.equal(head, tensors["wte.weight"])):
            raise FastGPTError(f"{path}: lm_head.weight differs from the token embedding, but config.json ties "
                               "them (tie_word_embeddings is true), so this untied head would be ignored")
    else:
        want = (cfg.vocab_size, cfg.n_embd)
        if head is None:
            raise FastGPTError(f"{path}: missing tensor 'lm_head.weight' (config.json sets tie_word_embeddings "
                               "to false: the head is its own matrix)")
        if tuple(head.shape) != want or not head.is_floating_point():
            raise FastGPTError(f"{path}: tensor 'lm_head.weight' has shape {tuple(head.shape)} and dtype "
                               f"{head.dtype}, but the config needs {want} floats")
        state["lm_head.weight"] = head
    return build_model(cfg, state, device, dtype)


# ---------------------------------------------------------------- writing
def save_hf(model, directory: str | Path) -> None:
    """Write `model` as a Hugging Face GPT-2 directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = file_state(model)  # vocab_size rows, as every file holds them
    tensors = {PREFIX + name: t for name, t in to_gpt2(model, state).items()}
    if not model.config.tie_embeddings:  # (a tied head is tied again by transformers: tie_word_embeddings)
        tensors["lm_head.weight"] = state[TIED]
    dtype = model.tok_emb.weight.dtype
    replace_file(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    replace_file(directory / "config.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n"))

