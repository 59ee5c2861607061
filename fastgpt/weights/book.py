"""Checkpoints of "Build a Large Language Model (From Scratch)": the book's `GPTModel` state dicts.

The book saves `torch.save(model.state_dict(), "model.pth")`. Its names are its own
(`trf_blocks.{i}.att.W_query`, `norm1.scale`, `out_head`, ...), and the file holds no
config: the vocabulary, context, width, depth and whether the Q/K/V projections have
a bias all follow from the tensors' shapes. Only the head count does not, so it is an
argument, or GPT-2's for its standard widths.

The book's model is fastgpt's with an untied head (`tie_embeddings=False`) and
LayerNorm eps 1e-5; where it has no Q/K/V bias, fastgpt's fused projection gets a zero
bias, which computes exactly the same. Accepted variations of the file:

- `GPTModel` (W_query / W_key / W_value / out_proj, LayerNorm `scale` / `shift`) or the
  faster `GPTModelFast` (one `att.qkv`, `att.proj`, `nn.LayerNorm` `weight` / `bias`);
- the causal `att.mask` buffer present, or absent (the KV-cache variants);
- `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes;
- `{"model_state_dict": ..., "optimizer_state_dict": ...}` training checkpoints;
- a chapter-6 classifier: `out_head` of shape [num_classes, d] with a bias.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import GPTConfig
from ..errors import FastGPTError
from .state import build_model

FILE_SUFFIXES = (".pth", ".pt")
PREFIXES = ("_orig_mod.", "module.")
WRAPPER_KEY = "model_state_dict"
# GPT-2's released widths and their head counts (64-wide heads).
STANDARD_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}
_BLOCK_KEY = re.compile(r"trf_blocks\.(\d+)\.(.+)")

# Per-block names of each variant -> fastgpt names (Q/K/V are handled apart: the book may split them).
_SHARED = {"att.out_proj.weight": "attn.proj.weight", "att.out_proj.bias": "attn.proj.bias",
           "ff.layers.0.weight": "mlp.fc.weight", "ff.layers.0.bias": "mlp.fc.bias",
           "ff.layers.2.weight": "mlp.proj.weight", "ff.layers.2.bias": "mlp.proj.bias"}
_BLOCK_NAMES = {
    "GPTModel": {**_SHARED, "norm1.scale": "ln_1.weight", "norm1.shift": "ln_1.bias",
                 "norm2.scale": "ln_2.weight", "norm2.shift": "ln_2.bias"},
    "GPTModelFast": {**{k.replace("out_proj", "proj"): v for k, v in _SHARED.items()},
                     "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
                     "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias"},
}
_FINAL_NORM = {"GPTModel": ("final_norm.scale", "final_norm.shift"),
               "GPTModelFast": ("final_norm.weight", "final_norm.bias")}
_SPLIT_QKV = ("att.W_query", "att.W_key", "att.W_value")


@dataclass(frozen=True)
class BookLayout:
    """What a book state dict's shapes say about the model that saved it."""
    variant: str           # "GPTModel" or "GPTModelFast"
    vocab_size: int
    context_length: int
    n_embd: int
    n_layer: int
    qkv_bias: bool
    num_classes: int | None  # a chapter-6 classifier's class count; None for a language model


def is_book_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in FILE_SUFFIXES


def find_book_file(directory: Path) -> Path | None:
    """The one `.pth` file in `directory` (None if it holds none; several are an error).

    Only `.pth`, the book's name: a training checkpoint's directory holds `optimizer.pt` and `rng.pt`."""
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() == ".pth")
    if len(found) > 1:
        raise FastGPTError(f"{directory}: holds several checkpoints ({', '.join(p.name for p in found)}); "
                           "name the one to load")
    return found[0] if found else None


def read_book_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's state dict with training wrappers and prefixes removed (loaded with weights_only=True)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FastGPTError(f"{path}: not a loadable PyTorch weights file ({first_line})") from None
    if isinstance(raw, dict) and WRAPPER_KEY in raw:
        raw = raw[WRAPPER_KEY]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise FastGPTError(f"{path}: expected a state dict of tensors (or a dict with {WRAPPER_KEY!r})")
    state = {}
    for key, tensor in raw.items():
        name = key
        while name.startswith(PREFIXES):
            name = next(name.removeprefix(p) for p in PREFIXES if name.startswith(p))
        if name in state:
            raise FastGPTError(f"{path}: tensor {key!r} repeats {name!r} under another prefix")
        state[name] = tensor
    return state


def detect_layout(state: dict[str, torch.Tensor], source: str) -> BookLayout:
    """The model's sizes from the tensors' shapes; a state dict of another layout is a one-line error."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in state:
            raise FastGPTError(f"{source}: missing tensor {name!r}")
        return tuple(state[name].shape)

    if not any(k.startswith(("trf_blocks.", "final_norm.")) for k in state):
        raise FastGPTError(f"{source}: not a checkpoint of the book's GPTModel (no trf_blocks.* or final_norm.* "
                           f"tensors; first key {next(iter(state))!r})")
    variant = "GPTModelFast" if "final_norm.weight" in state else "GPTModel"
    vocab_size, n_embd = shape("tok_emb.weight")
    context_length = shape("pos_emb.weight")[0]
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.fullmatch(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise FastGPTError(f"{source}: transformer blocks numbered {blocks[:8]}..., expected 0, 1, 2, ...")
    qkv_bias = (f"trf_blocks.0.{_SPLIT_QKV[0]}.bias" if variant == "GPTModel" else "trf_blocks.0.att.qkv.bias") in state
    head = shape("out_head.weight")
    num_classes = None
    if "out_head.bias" in state or head[0] != vocab_size:
        if "out_head.bias" not in state:
            raise FastGPTError(f"{source}: out_head.weight has {head[0]} rows but the vocabulary has {vocab_size}, "
                               "and there is no out_head.bias (a chapter-6 classifier has one)")
        num_classes = head[0]
    return BookLayout(variant, vocab_size, context_length, n_embd, len(blocks), qkv_bias, num_classes)


def head_count(n_embd: int, n_head: int | None, source: str) -> int:
    """`n_head` if given, else GPT-2's head count for a standard width; the file cannot say."""
    if n_head is None:
        if n_embd not in STANDARD_HEADS:
            raise FastGPTError(f"{source}: the book's files do not store the head count and width {n_embd} is not "
                               f"a GPT-2 width ({', '.join(map(str, STANDARD_HEADS))}); give it with --n-head N "
                               f"(e.g. fastgpt convert {source} --out DIR --n-head N)")
        return STANDARD_HEADS[n_embd]
    if not isinstance(n_head, int) or n_head < 1 or n_embd % n_head:
        raise FastGPTError(f"--n-head: {n_head!r} does not divide the width {n_embd} of {source}")
    return n_head


def book_config(layout: BookLayout, n_head: int) -> GPTConfig:
    """The fastgpt config of the book's model: untied head, PyTorch's default init as the book keeps it.

    A classifier has no LM head, so its body is saved tied (the head slot is the embedding, unused)."""
    return GPTConfig(vocab_size=layout.vocab_size, context_length=layout.context_length, n_layer=layout.n_layer,
                     n_head=n_head, n_embd=layout.n_embd, layer_norm_eps=1e-5,
                     tie_embeddings=layout.num_classes is not None, init="pytorch")


def to_fastgpt_state(state: dict[str, torch.Tensor], layout: BookLayout, source: str) -> dict[str, torch.Tensor]:
    """fastgpt-named tensors (and `classifier.weight` / `classifier.bias` for a classifier), shapes checked.

    Every tensor of the file must be used: a name this reader does not know is an error, not skipped."""
    d, C = layout.n_embd, layout.context_length
    remaining = dict(state)

    def take(name: str, want: tuple[int, ...]) -> torch.Tensor:
        if name not in remaining:
            raise FastGPTError(f"{source}: missing tensor {name!r}")
        tensor = remaining.pop(name)
        if tuple(tensor.shape) != want:
            raise FastGPTError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {want}")
        if not tensor.is_floating_point():
            raise FastGPTError(f"{source}: tensor {name!r} has dtype {tensor.dtype}, expected floats")
        return tensor

    shapes = {"weight": {"attn.proj": (d, d), "mlp.fc": (4 * d, d), "mlp.proj": (d, 4 * d)},
              "bias": {"attn.proj": (d,), "mlp.fc": (4 * d,), "mlp.proj": (d,)}}
    out = {"tok_emb.weight": take("tok_emb.weight", (layout.vocab_size, d)),
           "pos_emb.weight": take("pos_emb.weight", (C, d))}
    causal = torch.triu(torch.ones(C, C, dtype=torch.bool), diagonal=1)
    for i in range(layout.n_layer):
        prefix = f"trf_blocks.{i}."
        if layout.variant == "GPTModel":
            weight = torch.cat([take(f"{prefix}{n}.weight", (d, d)) for n in _SPLIT_QKV])
            bias = torch.cat([take(f"{prefix}{n}.bias", (d,)) for n in _SPLIT_QKV]) if layout.qkv_bias else None
        else:
            weight = take(f"{prefix}att.qkv.weight", (3 * d, d))
            bias = take(f"{prefix}att.qkv.bias", (3 * d,)) if layout.qkv_bias else None
        if bias is None:  # no bias in the book's model: a zero bias computes exactly the same
            bias = torch.zeros(3 * d, dtype=weight.dtype)
        out[f"blocks.{i}.attn.qkv.weight"], out[f"blocks.{i}.attn.qkv.bias"] = weight, bias
        for book_name, ours in _BLOCK_NAMES[layout.variant].items():
            module, kind = ours.rsplit(".", 1)
            want = shapes[kind].get(module, (d,))  # LayerNorm scale / shift are (d,)
            out[f"blocks.{i}.{ours}"] = take(prefix + book_name, want)
        mask = remaining.pop(f"{prefix}att.mask", None)
        if mask is not None and (tuple(mask.shape) != (C, C) or not torch.equal(mask.bool(), causal)):
            raise FastGPTError(f"{source}: {prefix}att.mask is not the causal mask of a context of {C} "
                               f"(shape {tuple(mask.shape)})")
    norm_weight, norm_bias = _FINAL_NORM[layout.variant]
    out["ln_f.weight"], out["ln_f.bias"] = take(norm_weight, (d,)), take(norm_bias, (d,))
    if layout.num_classes is None:
        out["lm_head.weight"] = take("out_head.weight", (layout.vocab_size, d))
    else:
        out["classifier.weight"] = take("out_head.weight", (layout.num_classes, d))
        out["classifier.bias"] = take("out_head.bias", (layout.num_classes,))
    if remaining:
        raise FastGPTError(f"{source}: unexpected tensor {sorted(remaining)[0]!r} for the book's {layout.variant} "
                           f"(qkv bias {layout.qkv_bias})")
    return out


def read_book(path: str | Path, n_head: int | None = None):
    """(GPTConfig, fastgpt-named tensors, layout) of a book checkpoint file."""
    path = Path(path)
    state = read_book_state(path)
    layout = detect_layout(state, str(path))
    cfg = book_config(layout, head_count(layout.n_embd, n_head, str(path)))
    return cfg, to_fastgpt_state(state, layout, str(path)), layout


def book_metadata(path: Path, layout: BookLayout) -> dict:
    """What a converted model records about where it came from."""
    return {"source": "book", "source_file": Path(path).name, "book_variant": layout.variant,
            "qkv_bias": layout.qkv_bias}


def build_book(path: str | Path, n_head: int | None = None, device="cpu", dtype=None):
    """(GPT in eval mode, classifier head {"weight", "bias"} or None, metadata) from a book checkpoint file.

    A chapter-6 classifier has no LM head: its body is returned tied (see `book_config`) with its head apart."""
    cfg, tensors, layout = read_book(path, n_head)
    head = None
    if layout.num_classes is not None:
        head = {"weight": tensors.pop("classifier.weight"), "bias": tensors.pop("classifier.bias")}
    return build_model(cfg, tensors, device, dtype), head, book_metadata(Path(path), layout)


def load_book(path: str | Path, n_head: int | None = None, device="cpu", dtype=None):
    """(GPT in eval mode, metadata) from a book language-model checkpoint file.

    A chapter-6 classifier is refused here: it has no LM head; `fastgpt convert` turns it
    into a classifier directory for `fastgpt classify`."""
    model, head, metadata = build_book(path, n_head, device, dtype)
    if head is not None:
        raise FastGPTError(f"{path}: a chapter-6 classifier ({head['weight'].shape[0]} classes), not a language "
                           f"model; make it a fastgpt classifier with: fastgpt convert {path} --out DIR")
    return model, metadata
