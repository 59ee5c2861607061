"""Load and save GPT-2 weights in the formats they are found in.

`load_pretrained(path)` looks at what is in the directory and picks the reader:

- `config.json` with `"format": "fastgpt"`     -> fastgpt's own checkpoint (`native`)
- `config.json` with `"model_type": "gpt2"`     -> a Hugging Face GPT-2 directory (`hf`)
- `hparams.json`                                -> OpenAI's original TensorFlow release (`openai_tf`)
- a `.pth` / `.pt` file, or a directory holding one -> the book's GPTModel state dict (`book`)

A bare preset name (`"gpt2"`, ...) that is not a directory means the copy
`fastgpt download` keeps in its cache. Every reader checks each tensor's name and
shape against the config and reports the first problem as one FastGPTError line.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import FastGPTError

__all__ = ["load_pretrained", "load_fastgpt", "save_fastgpt", "save_pretrained", "resolve"]


def resolve(path: str | Path) -> Path:
    """The directory `path` names: itself, or for a released model name the `fastgpt download` cache."""
    directory = Path(path).expanduser()
    if directory.exists():
        if not directory.is_dir():
            raise FastGPTError(f"{directory}: expected a model directory, found a file")
        return directory
    from .download import MODELS, default_cache_dir
    if str(path) in MODELS:
        cached = default_cache_dir() / str(path)
        if cached.is_dir():
            return cached
        raise FastGPTError(f"{path}: not downloaded yet (run: fastgpt download {path})")
    raise FastGPTError(f"{directory}: no such model directory")


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise FastGPTError(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise FastGPTError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise FastGPTError(f"{path}: expected a JSON object")
    return raw


def _load(path, device, dtype):
    # The readers import torch, so they are imported here: `fastgpt --help` stays fast.
    from .book import find_book_file, is_book_file, load_book
    from .hf import load_hf
    from .native import load_fastgpt_dir
    from .openai_tf import load_openai_tf
    if is_book_file(Path(path).expanduser()):
        return load_book(Path(path).expanduser(), device=device, dtype=dtype)
    directory = resolve(path)
    config, hparams = directory / "config.json", directory / "hparams.json"
    if config.is_file():
        raw = _read_json(config)
        if raw.get("format") == "fastgpt":
            return load_fastgpt_dir(directory, raw, device, dtype)
        if raw.get("model_type") == "gpt2":
            return load_hf(directory, raw, device, dtype), {}
        if "model_type" in raw:
            raise FastGPTError(f"{config}: model_type {raw['model_type']!r} is not supported (only 'gpt2')")
        raise FastGPTError(f"{config}: unknown config format (neither 'format': 'fastgpt' nor 'model_type': 'gpt2')")
    if hparams.is_file():
        return load_openai_tf(directory, _read_json(hparams), device, dtype), {}
    if (book_file := find_book_file(directory)) is not None:
        return load_book(book_file, device=device, dtype=dtype)
    raise FastGPTError(f"{directory}: not a model directory (no config.json or hparams.json)")


def load_pretrained(path: str | Path, device="cpu", dtype=None):
    """A GPT in eval mode from a fastgpt, Hugging Face or OpenAI TensorFlow directory (dtype default float32)."""
    return _load(path, device, dtype)[0]


def load_fastgpt(path: str | Path, device="cpu", dtype=None):
    """(model, metadata) from any supported directory; metadata is {} unless it is a fastgpt checkpoint."""
    return _load(path, device, dtype)


def save_pretrained(model, directory: str | Path) -> None:
    """Write a Hugging Face GPT-2 directory that `transformers.GPT2LMHeadModel.from_pretrained` loads."""
    from .hf import save_hf
    save_hf(model, directory)


def save_fastgpt(model, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write fastgpt's own checkpoint directory (config, weights, JSON metadata); see `native`."""
    from .native import save_fastgpt as save
    return save(model, directory, metadata)
