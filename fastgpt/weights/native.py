"""fastgpt's own checkpoint directory: the config, the weights, and free-form metadata.

    config.json        {"format": "fastgpt", "version": 1, "config": {GPTConfig fields}, "metadata": {...}}
    model.safetensors  parameters under fastgpt's names (a tied LM head is the token
                       embedding, stored once; an untied one is `lm_head.weight`)

Trainers and fine-tuners keep what the weights alone cannot say in `metadata`:
label maps, a prompt template, the step and loss a checkpoint was taken at.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import GPTConfig
from ..errors import FastGPTError
from .atomic import replace_file
from .hf import load_safetensors
from .state import TIED, build_model, expected_shapes, file_state

FORMAT = "fastgpt"
VERSION = 1


def save_fastgpt(model, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write `model` (and JSON-serialisable `metadata`) to `directory`; returns the directory.

    Each file is replaced atomically, weights first and config.json last, so other
    files a trainer keeps in the same directory are left alone.
    """
    from safetensors.torch import save_file
    directory = Path(directory)
    try:
        config_text = json.dumps({"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
                                  "metadata": metadata or {}}, indent=2) + "\n"
    except (TypeError, ValueError) as err:
        raise FastGPTError(f"save_fastgpt: metadata must be JSON-serialisable ({err})") from None
    directory.mkdir(parents=True, exist_ok=True)
    tensors = file_state(model)
    replace_file(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    replace_file(directory / "config.json", lambda tmp: tmp.write_text(config_text))
    return directory


def read_fastgpt_config(raw: dict, source: str) -> tuple[GPTConfig, dict]:
    if raw.get("version", VERSION) != VERSION:
        raise FastGPTError(f"{source}: fastgpt checkpoint version {raw.get('version')!r} is not supported "
                           f"(this fastgpt reads version {VERSION})")
    if not isinstance(raw.get("config"), dict):
        raise FastGPTError(f"{source}: missing key 'config'")
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FastGPTError(f"{source}: key 'metadata' must be an object")
    return GPTConfig.from_dict(raw["config"], source=source), metadata


def load_fastgpt_dir(directory: Path, raw: dict, device="cpu", dtype=None):
    """(model, metadata) from a fastgpt directory whose config.json was parsed into `raw`."""
    cfg, metadata = read_fastgpt_config(raw, str(directory / "config.json"))
    path = directory / "model.safetensors"
    if not path.is_file():
        raise FastGPTError(f"{directory}: missing model.safetensors")
    tensors = load_safetensors(path)
    if cfg.tie_embeddings:
        tensors.pop(TIED, None)  # a tied matrix may also be stored under the head's name
    shapes = expected_shapes(cfg)
    for name, shape in shapes.items():
        if name not in tensors:
            raise FastGPTError(f"{path}: missing tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise FastGPTError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                               f"but the config needs {shape}")
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise FastGPTError(f"{path}: unexpected tensor {unexpected[0]!r}")
    return build_model(cfg, tensors, device, dtype), metadata
