"""Checkpoints that survive a crash at any moment, and resume bit-for-bit.

A checkpoint directory `ckpt_000500/` holds:
  model/            the weights in fastgpt's own format (config.json + model.safetensors)
  optimizer.pt      AdamW moments (and the fp16 GradScaler), loaded with weights_only=True
  rng.pt            torch CPU and CUDA generator states
  state.json        step, tokens seen, best val loss, Python/numpy RNG states, the resolved TrainConfig

Atomicity: everything is written into `ckpt_000500.tmp/`, flushed to disk, and
only then renamed to `ckpt_000500/`. A rename is atomic, so a directory named
`ckpt_*` is always complete; a crash mid-save leaves a `.tmp` that is ignored
and removed by the next run, and the previous checkpoints untouched.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import GPTConfig
from ..errors import FastGPTError
from ..tokenizer import TOKENIZER_DIR
from ..weights import load_fastgpt, save_fastgpt

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)$")
# Test hook: exit abruptly inside the save of this step, after the temp dir is written, before the rename.
CRASH_IN_SAVE_ENV = "FASTGPT_TEST_CRASH_IN_SAVE"


# ---------------------------------------------------------------------- model files
def load_model_state(directory: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    """(config, state dict, metadata) of a saved model directory (fastgpt's format, or any `load_fastgpt` reads)."""
    model, metadata = load_fastgpt(directory)
    return model.config, model.state_dict(), metadata


# ---------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict, dict]:
    """(JSON-able Python/numpy states, tensor states for torch CPU and, once this process has used
    CUDA, the CUDA generators). Asking a GPU's generator for its state would start a CUDA context."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CPU run on a GPU host leaves CUDA alone
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


# ---------------------------------------------------------------------- save / load
def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(directory: Path, model, optimizer_state: dict, scaler, state: dict, tokenizer=None,
                    extra=None) -> Path:
    """Write a complete checkpoint atomically to `directory` (replacing an older one of that name).

    `optimizer_state`: `optimizer.state_dict()`, or under FSDP the gathered full state.
    `tokenizer`: a run's own `BPETokenizer`, saved in `model/tokenizer/` so that the
    model directory alone is enough to generate text (None: GPT-2's, nothing saved).
    `extra(tmp_dir)`: writes a caller's own files (e.g. LoRA adapters) into the checkpoint
    before it is published, so they are part of the same atomic rename.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    metadata = {"step": state["step"], "tokens_seen": state["tokens_seen"]}
    if tokenizer is not None:
        tokenizer.save(tmp / "model" / TOKENIZER_DIR)
        metadata["tokenizer"] = "bpe"  # read back by fastgpt.tokenizer.load_tokenizer(model dir)
    save_fastgpt(model, tmp / "model", metadata)
    torch.save({"optimizer": optimizer_state,
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None},
               tmp / "optimizer.pt")
    plain, tensors = rng_state()
    torch.save(tensors, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "rng": plain}, indent=1))
    if extra is not None:
        extra(tmp)
    _fsync_tree(tmp)
    if os.environ.get(CRASH_IN_SAVE_ENV) == str(state["step"]):
        os._exit(17)  # simulate a kill between writing and publishing the checkpoint
    if directory.exists():  # re-saving a name: move the old one aside first, then drop it
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete periodic checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove half-written `*.tmp` / `*.old` checkpoint dirs left by a crash."""
    removed = []
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.is_dir() and p.suffix in (".tmp", ".old"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` periodic checkpoints (0 keeps them all)."""
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or the latest complete checkpoint of a run dir."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if not path.is_dir():
        raise FastGPTError(f"--resume: no such run or checkpoint directory {path}")
    found = list_checkpoints(path)
    if not found:
        raise FastGPTError(f"--resume: {path} holds no complete checkpoint (ckpt_*/)")
    return found[-1]


def read_state(ckpt: Path) -> dict:
    state_path = Path(ckpt) / "state.json"
    try:
        return json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FastGPTError(f"{state_path}: unreadable checkpoint state ({err})") from None


def load_weights_and_rng(ckpt: Path, model) -> dict:
    """Restore weights (into the unwrapped model) and the RNG states; returns state.json."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    config, weights, _ = load_model_state(ckpt / "model")
    if config.to_dict() | {"dropout": 0} != model.config.to_dict() | {"dropout": 0}:
        raise FastGPTError(f"{ckpt}: checkpoint architecture {config.to_dict()} differs from the model's")
    model.load_state_dict(weights)
    tensors = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    set_rng_state(state["rng"], tensors)
    return state


def load_optimizer_file(ckpt: Path, device: torch.device) -> dict:
    """{"optimizer": state dict, "scaler": state dict or None}, read without unpickling code."""
    return torch.load(Path(ckpt) / "optimizer.pt", map_location=device, weights_only=True)
