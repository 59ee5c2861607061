"""Test helper: write an OpenAI-style GPT-2 TensorFlow release directory from Hugging Face weights.

The variable naming here is spelled out independently of fastgpt's own loader
(`fastgpt.weights.openai_tf`), so a naming mistake there is not mirrored here.
The bundle itself is written by `fastgpt.weights.tensor_bundle.write_bundle`, which
`test_tensor_bundle_matches_tensorflow` checks against real TensorFlow when installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fastgpt.weights.tensor_bundle import write_bundle

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def openai_variables(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel state dict -> {'model/h0/attn/c_attn/w': (1, in, out) tensor, ...}."""
    out = {}
    for key, tensor in hf_state.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name in ("wte.weight", "wpe.weight"):
            out[f"model/{name[:3]}"] = tensor
            continue
        parts = name.split(".")
        if parts[0] == "h":  # h.3.mlp.c_fc.weight -> model/h3/mlp/c_fc/w
            module, leaf = ".".join(parts[2:-1]), parts[-1]
            prefix = f"model/h{parts[1]}/" + module.replace(".", "/")
        else:  # ln_f.weight -> model/ln_f/g
            module, leaf = parts[0], parts[1]
            prefix = f"model/{module}"
        if module.startswith("ln_"):
            out[f"{prefix}/{'g' if leaf == 'weight' else 'b'}"] = tensor
        elif leaf == "weight":
            assert module in CONV1D, name
            out[f"{prefix}/w"] = tensor.unsqueeze(0)  # OpenAI stores a 1x1 convolution kernel
        else:
            out[f"{prefix}/b"] = tensor
    return out


def write_openai_release(directory: Path, hf_model) -> Path:
    """The files of OpenAI's release (minus the graph .meta and the BPE files) for `hf_model`."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = hf_model.config
    (directory / "hparams.json").write_text(json.dumps(
        {"n_vocab": cfg.vocab_size, "n_ctx": cfg.n_positions, "n_embd": cfg.n_embd,
         "n_head": cfg.n_head, "n_layer": cfg.n_layer}, indent=2))
    (directory / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                          'all_model_checkpoint_paths: "model.ckpt"\n')
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    write_bundle(directory / "model.ckpt", openai_variables(state))
    return directory
