"""Loading the model to fine-tune, and saving what fine-tuning made.

A fine-tuned model is an ordinary fastgpt model directory (`fastgpt.weights`)
whose metadata says what it became: an instruction model records its prompt
template (`metadata["template"]`), a classifier its task, label names and the
file holding its head (`classifier.safetensors`, written beside the body).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import PRESETS
from ..errors import FastGPTError
from ..model import GPT
from ..tokenizer import TOKENIZER_DIR, Tokenizer, load_tokenizer
from ..weights import load_fastgpt, save_fastgpt
from ..weights.download import MODELS
from .classifier import GPTClassifier
from .files import write_atomic

HEAD_FILE = "classifier.safetensors"


def load_model(spec: str, device: torch.device | str = "cpu"):
    """(GPT, metadata) from a model directory (fastgpt, Hugging Face or OpenAI GPT-2; or a
    downloaded model's name such as gpt2), or the preset tiny / mini for a random start."""
    if spec in PRESETS and spec not in MODELS and not Path(spec).exists():
        return GPT(spec).to(device), {}  # released names (gpt2, ...) mean the downloaded weights, never random
    model, metadata = load_fastgpt(spec, device)
    return model, dict(metadata or {})


def model_tokenizer(spec: str):
    """The tokenizer the model `spec` was trained with (its own BPE, or GPT-2's)."""
    return load_tokenizer(spec if Path(spec).is_dir() else None)


def save_model(model, out_dir, metadata: dict, tokenizer=None) -> None:
    """A fastgpt model directory; a model's own BPE tokenizer travels with it."""
    save_fastgpt(model, Path(out_dir), metadata)
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer.save(Path(out_dir) / TOKENIZER_DIR)


def save_classifier(clf, out_dir, labels: list[str], metadata: dict, tokenizer=None) -> None:
    """The body as a fastgpt model, its head in classifier.safetensors, labels in the metadata."""
    out_dir = Path(out_dir)
    head = {"classifier.weight": clf.head.weight.detach().cpu().contiguous(),
            "classifier.bias": clf.head.bias.detach().cpu().contiguous()}
    write_atomic(out_dir / HEAD_FILE, lambda tmp: save_file(head, tmp))
    save_model(clf.gpt, out_dir, {**metadata, "task": "classification", "labels": list(labels),
                                  "classifier_head": HEAD_FILE}, tokenizer)


def load_classifier(path, device: torch.device | str = "cpu"):
    """(GPTClassifier, metadata) saved by `save_classifier`."""
    gpt, metadata = load_model(str(path), device)
    labels = metadata.get("labels")
    if metadata.get("task") != "classification" or not labels:
        raise FastGPTError(f"{path}: not a classifier (no task 'classification' with labels in its metadata; "
                           "make one with `fastgpt finetune classify`)")
    head_path = Path(path) / metadata.get("classifier_head", HEAD_FILE)
    if not head_path.is_file():
        raise FastGPTError(f"{head_path}: classifier head missing")
    head = load_file(str(head_path))
    clf = GPTClassifier(gpt, len(labels), metadata.get("pooling", "last"))
    for name in ("weight", "bias"):
        tensor = head.get(f"classifier.{name}")
        target = getattr(clf.head, name)
        if tensor is None or tensor.shape != target.shape:
            raise FastGPTError(f"{head_path}: classifier.{name} missing or not of shape {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
    return clf.to(device).eval(), metadata
